"""The small shared helpers: seeds and seeded draws, device and dtype selection, sizes, image files, JSON lines."""
import os

import pytest
import torch
from PIL import Image

from micro_diffusion.utils import devices
from micro_diffusion.utils.devices import composer_device, loader_workers, torch_device, usable_cpus
from micro_diffusion.utils.images import grid, save_atomic, to_pil
from micro_diffusion.utils.jsonl import read_jsonl
from micro_diffusion.utils.seeds import derive_seed, draw, seeded_generator
from micro_diffusion.utils.sizes import as_hw


def test_derived_seeds_are_fixed_by_all_their_keys():
    assert derive_seed(3, 7) == derive_seed(3, 7)
    seeds = {derive_seed(a, b) for a in range(30) for b in range(30)}
    assert len(seeds) == 900 and derive_seed(1, 23) != derive_seed(12, 3)  # no arithmetic aliasing
    assert derive_seed(5) != derive_seed(5, 0) != derive_seed(5, 0, 0) and all(0 <= s < 2**63 for s in seeds)
    torch.Generator().manual_seed(max(seeds))  # every seed is one torch accepts
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(1, -2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_device_requests_without_cuda():
    assert torch_device(None) == torch_device("auto") == torch_device("cpu") == torch.device("cpu")
    assert composer_device(torch_device("auto")) == "cpu"
    for name in ("gpu", "cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=repr(name)):
            torch_device(name)
    with pytest.raises(ValueError, match="'tpu'"):
        torch_device("tpu")


def test_sizes_and_images(tmp_path):
    assert as_hw(32) == (32, 32) and as_hw((16, 24)) == (16, 24) and as_hw([8, 4]) == (8, 4)
    images = to_pil(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(2, 3, 2, 3))
    assert images[0].size == (3, 2) and images[0].getpixel((0, 0)) == (0, 128, 255)
    tiled = grid(images * 2 + images[:1], cols=2)  # 5 tiles: 3 rows of 2, the last cell empty
    assert tiled.size == (6, 6) and tiled.getpixel((2, 5)) == (0, 128, 255) and tiled.getpixel((5, 5)) == (0, 0, 0)
    save_atomic(images[0], tmp_path / "a.png")
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"] and Image.open(tmp_path / "a.png").size == (3, 2)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a JSON record"):
        read_jsonl(path)


def test_loader_workers_fit_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cpus() == 2 and loader_workers(8) == 2 and loader_workers(1) == 1 and loader_workers(0) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight ranks share the node's 16 CPUs
    assert loader_workers(8) == 2 and loader_workers(1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert loader_workers(8) == 1, "a rank that asks for workers gets at least one"


def test_fid_uses_loader_workers_only_where_the_cpus_exist(monkeypatch, tmp_path):
    import torch_fidelity

    from micro_diffusion.eval import fid

    seen = []
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", lambda **kw: seen.append(kw["save_cpu_ram"]) or {
        "frechet_inception_distance": 1.0, "kernel_inception_distance_mean": 0.0, "kernel_inception_distance_std": 0.0})
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for cpus in (2, 4):  # torch-fidelity starts min(4, 2 x cores) = 4 workers: too many for 2 usable CPUs
        monkeypatch.setattr(fid, "usable_cpus", lambda n=cpus: n)
        fid.fid_kid(tmp_path, tmp_path, weights=tmp_path / "unused.pth")
    assert seen == [True, False]


def test_seeded_generators_and_draws_give_the_same_numbers_on_any_target_device():
    a = draw("randn", (3, 4), seeded_generator(7), "cpu")
    assert torch.equal(a, draw("randn", (3, 4), seeded_generator(7), "cpu", torch.float32))
    assert not torch.equal(a, draw("randn", (3, 4), seeded_generator(8), "cpu"))
    assert torch.equal(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(7)))  # torch's own stream
    half = draw("rand", (5,), seeded_generator(1), "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and bool(((half >= 0) & (half <= 1)).all())
    with pytest.raises(KeyError):
        draw("normal", (2,), None, "cpu")


@pytest.mark.parametrize("native", [False, True])
def test_compute_dtype_is_bf16_only_where_the_device_runs_it_natively(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)  # the CPU's answer, mocked
    assert devices.compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    assert devices.compute_dtype(torch.device("cuda")) == torch.bfloat16  # no GPU needed to name the choice
    assert devices.dtype_name(devices.compute_dtype("cpu")) == ("bf16" if native else "fp32")
    x = torch.randn(4, 4)
    with devices.autocast("cpu", devices.compute_dtype("cpu")):
        assert (x @ x).dtype == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="no compute dtype"):
        devices.dtype_name(torch.int8)
