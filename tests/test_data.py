"""Latent loader on real MDS shards: shapes, caption dropout, mixing, rank sharding, resumption; precompute."""
import gc
import io
import json
import multiprocessing
import os
import socket
import tempfile

import numpy as np
import pytest
from PIL import Image
from streaming import MDSWriter
from streaming.base.local import LocalDataset

from micro_diffusion.data.dataset import dropout_draw
from micro_diffusion.data.integrity import check_folder
from micro_diffusion.data.loader import build_dataloader
from micro_diffusion.data.schema import read_index_columns

LAT, CAP = (3, 4, 4), (5, 6)  # tiny latent (C,h,w) and caption (L,D) shapes: the loader must take them from the index


def write_latents(out, n, prefix, resolutions=(8,), seed=0):
    """n samples whose latents encode their index (latents[0,0,0] == i) and a null_caption.npy of ones."""
    rng = np.random.default_rng(seed)
    cols = {f"latents_{r}": f"ndarray:float16:{LAT[0]},{r // 2},{r // 2}" for r in resolutions}
    cols.update({"caption_emb": f"ndarray:float16:{CAP[0]},{CAP[1]}", "caption": "str", "id": "str"})
    with MDSWriter(out=str(out), columns=cols, size_limit=8192) as w:  # small shards: several per dataset
        for i in range(n):
            sample = {f"latents_{r}": np.full((LAT[0], r // 2, r // 2), i, np.float16) for r in resolutions}
            emb = rng.standard_normal(CAP).astype(np.float16) + 2.0  # never equal to the null caption (ones)
            sample.update({"caption_emb": emb, "caption": f"caption {prefix}{i}", "id": f"{prefix}{i}"})
            w.write(sample)
    np.save(os.path.join(out, "null_caption.npy"), np.ones(CAP, np.float16))
    return str(out)


def ids_of(loader):
    return [i for batch in loader for i in batch["id"]]


def test_shapes_dtypes_and_full_coverage(tmp_path):
    local = write_latents(tmp_path / "a", 100, "a", resolutions=(8, 16))
    assert read_index_columns(local)["latents_16"] == "ndarray:float16:3,8,8"
    loader = build_dataloader([{"local": local, "remote": None, "proportion": None}], batch_size=8, resolution=16,
                              caption_drop_prob=0.0, num_workers=1, drop_last=False)
    batches = list(loader)
    b = batches[0]
    assert b["latents"].shape == (8, 3, 8, 8) and b["latents"].dtype.is_floating_point
    assert str(b["latents"].dtype) == "torch.float32" and str(b["caption_emb"].dtype) == "torch.float32"
    assert b["caption_emb"].shape == (8, *CAP) and len(b["caption"]) == 8
    ids = [i for batch in batches for i in batch["id"]]
    assert sorted(ids) == sorted(f"a{i}" for i in range(100))  # every sample once
    assert ids != sorted(ids, key=lambda s: int(s[1:]))  # shuffled
    for batch in batches:  # latents belong to the sample named by id
        assert [int(v) for v in batch["latents"][:, 0, 0, 0]] == [int(i[1:]) for i in batch["id"]]


def test_missing_resolution_names_it_and_the_path(tmp_path):
    local = write_latents(tmp_path / "a", 10, "a")
    with pytest.raises(KeyError, match=r"latents_512.*|.*512") as err:
        build_dataloader([{"local": local, "remote": None, "proportion": None}], 2, 512, num_workers=0)
    assert "512" in str(err.value) and local in str(err.value)


def test_caption_dropout_rate_and_determinism(tmp_path):
    local = write_latents(tmp_path / "a", 600, "a")
    stream = [{"local": local, "remote": None, "proportion": None}]
    loader = build_dataloader(stream, 50, 8, caption_drop_prob=0.3, seed=5, num_workers=0)
    dropped = set()
    for batch in loader:
        for emb, cap, sid in zip(batch["caption_emb"], batch["caption"], batch["id"], strict=True):
            is_null = bool((emb == 1.0).all())
            assert is_null == (cap == ""), sid  # the caption string follows the embedding
            if is_null:
                dropped.add(sid)
    assert 0.24 <= len(dropped) / 600 <= 0.36
    # The choice is a pure function of (seed, epoch, sample index), with sample index == position in the shards here.
    expected = {f"a{i}" for i in range(600) if dropout_draw(5, 0, i) < 0.3}
    assert dropped == expected
    assert expected != {f"a{i}" for i in range(600) if dropout_draw(5, 1, i) < 0.3}  # a new draw each epoch


def test_null_caption_shape_checked(tmp_path):
    local = write_latents(tmp_path / "a", 10, "a")
    with pytest.raises(ValueError, match="null caption"):
        build_dataloader([{"local": local, "remote": None, "proportion": None}], 2, 8,
                         null_caption=np.zeros((4, 4)), num_workers=0)


def test_mixing_proportions(tmp_path):
    a = write_latents(tmp_path / "a", 300, "a")
    b = write_latents(tmp_path / "b", 300, "b", seed=1)
    loader = build_dataloader([{"local": a, "remote": None, "proportion": 0.8},
                               {"local": b, "remote": None, "proportion": 0.2}],
                              batch_size=20, resolution=8, epoch_size=500, num_workers=0, caption_drop_prob=0.0)
    ids = ids_of(loader)
    assert len(ids) == 500
    share_a = sum(i.startswith("a") for i in ids) / len(ids)
    assert abs(share_a - 0.8) < 0.03
    with pytest.raises(ValueError, match="proportion"):
        build_dataloader([{"local": a, "remote": None, "proportion": 0.8}, {"local": b, "remote": None}], 2, 8)


def _rank_worker(rank: int, local: str, tmpdir: str, port: int, queue) -> None:
    """One simulated rank of a 2-rank job: Streaming reads the rank layout from env vars (and joins a gloo group)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TMPDIR=tmpdir,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tempfile.tempdir = tmpdir
    loader = build_dataloader([{"local": local, "remote": None, "proportion": None}], batch_size=4, resolution=8,
                              num_workers=0, drop_last=False)
    queue.put((rank, ids_of(loader)))


def test_two_ranks_disjoint_and_complete(tmp_path):
    local = write_latents(tmp_path / "a", 64, "a")
    # Forked processes share the parent's imports (importing streaming costs seconds) but not its env or memory.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank_worker, args=(r, local, tempfile.gettempdir(), port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        assert p.exitcode == 0, f"rank process exit code {p.exitcode}"
    seen = dict(queue.get(timeout=5) for _ in procs)
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {f"a{i}" for i in range(64)}


def test_mid_epoch_resumption(tmp_path):
    local = write_latents(tmp_path / "a", 120, "a")
    stream = [{"local": local, "remote": None, "proportion": None}]
    opts = dict(batch_size=10, resolution=8, caption_drop_prob=0.3, seed=3, num_workers=0)
    loader = build_dataloader(stream, **opts)
    full = [(b["id"], b["caption"]) for b in loader]
    del loader
    gc.collect()

    loader = build_dataloader(stream, **opts)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    assert state["sample_in_epoch"] == 40
    del it, loader
    gc.collect()

    resumed = build_dataloader(stream, **opts)
    resumed.load_state_dict(state)
    rest = [(b["id"], b["caption"]) for b in resumed]
    assert rest == full[4:]  # same samples, same order, same caption dropout


def image_size(i: int) -> tuple[int, int]:
    """(w, h) of write_images' image i: short sides of 12, 14 and 16 px."""
    return 20 + 3 * i, 12 + 2 * (i % 3)


def write_images(out, n):
    """n small PNGs of different sizes and colours in MDS image shards (data_prep.convert's columns)."""
    cols = {"image": "bytes", "caption": "str", "width": "int", "height": "int", "id": "str"}
    with MDSWriter(out=str(out), columns=cols) as w:
        for i in range(n):
            size = image_size(i)
            buf = io.BytesIO()
            Image.new("RGB", size, (10 * i % 256, 200, 30)).save(buf, format="PNG")
            w.write({"image": buf.getvalue(), "caption": f"a green picture number {i}", "width": size[0],
                     "height": size[1], "id": f"img{i}"})
    return out


@pytest.mark.slow
def test_precompute_end_to_end_and_resume(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from data_prep.precompute import crop_resize, main, precompute
    from micro_diffusion.encoders import load_vae

    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                  scaling_factor=0.4).save_pretrained(tmp_path / "vae")
    images = write_images(tmp_path / "images", 11)
    out = tmp_path / "latents"
    argv = [str(images), "--out", str(out), "--resolution", "16", "8", "--vae", str(tmp_path / "vae"),
            "--text-encoder", "minilm", "--batch-size", "4", "--chunk-size", "5", "--no-progress"]
    assert main(argv) == 0  # the command once; the same run as a function call below

    def run(**changed) -> dict:
        """The same precompute as `argv`, called as a function; returns its summary."""
        options = {"vae": str(tmp_path / "vae"), "text_encoder": "minilm", "caption_len": 77, "batch_size": 4,
                   "chunk_size": 5, "progress": False, **changed}
        return precompute(images, out, [16, 8], **options)

    cols = read_index_columns(out)
    assert cols == {"latents_16": "ndarray:float16:4,8,8", "latents_8": "ndarray:float16:4,4,4",
                    "caption_emb": "ndarray:float16:77,384", "caption": "str", "id": "str"}
    info = json.loads((out / "encoders.json").read_text())
    assert info["scaling_factor"] == pytest.approx(0.4) and info["downsample"] == 2
    assert (info["caption_len"], info["caption_dim"], info["text_encoder"], info["resolutions"]) == (77, 384,
                                                                                                     "minilm", [16, 8])
    null = np.load(out / "null_caption.npy")
    assert null.shape == (77, 384) and null.dtype == np.float16

    data = LocalDataset(str(out))
    assert [data[i]["id"] for i in range(len(data))] == [f"img{i}" for i in range(11)]
    # Latents are the scaled posterior mean of the centre-cropped image: check one sample against the VAE itself.
    src = LocalDataset(str(images))
    img = Image.open(io.BytesIO(src[7]["image"])).convert("RGB")
    expected = load_vae(str(tmp_path / "vae")).encode(crop_resize(img, 16)[None])[0].numpy()
    np.testing.assert_allclose(data[7]["latents_16"].astype(np.float32), expected, rtol=1e-2, atol=2e-3)

    # A second run does nothing new; a run whose last chunk was lost redoes only that chunk.
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*.mds")}
    assert run()["samples"] == 11
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.mds")} == files
    (out / "part-00002.done").unlink()
    assert run()["samples"] == 11
    changed = {p for p in out.rglob("*.mds") if p.stat().st_mtime_ns != files.get(p)}
    assert changed and all("part-00002" in str(p) for p in changed)
    again = LocalDataset(str(out))
    assert [again[i]["id"] for i in range(len(again))] == [f"img{i}" for i in range(11)]
    np.testing.assert_array_equal(again[10]["caption_emb"], data[10]["caption_emb"])
    summary = json.loads((out / "precompute_summary.json").read_text())
    assert summary["samples"] == 11 and summary["upscaled"] == {
        str(r): sum(min(image_size(i)) < r for i in range(11)) for r in (16, 8)} and summary["upscaled"]["16"] > 0

    # A truncated shard is written again by the next run (size check); a corrupted one by a run with --verify-hashes.
    cut = next((out / "part-00001").glob("*.mds"))
    cut.write_bytes(cut.read_bytes()[:100])
    assert run()["samples"] == 11 and check_folder(out, hashes=True) == []
    rot = next((out / "part-00000").glob("*.mds"))
    rot.write_bytes(rot.read_bytes()[:-64] + b"\xff" * 64)
    assert run()["samples"] == 11 and "expected xxh64" in check_folder(out, hashes=True)[0]
    assert run(verify_hashes=True)["samples"] == 11 and check_folder(out, hashes=True) == []
    fixed = LocalDataset(str(out))
    assert [fixed[i]["id"] for i in range(len(fixed))] == [f"img{i}" for i in range(11)]
    np.testing.assert_allclose(fixed[7]["latents_16"].astype(np.float32), expected, rtol=1e-2, atol=2e-3)
    with pytest.raises(ValueError, match="other options"):
        run(chunk_size=4)
    assert main(argv[:-5] + ["--chunk-size", "4", "--no-progress", "--batch-size", "4"]) == 1  # the command: one line
    assert "other options" in capsys.readouterr().err
