"""Exports are replaced whole: a kill or Ctrl-C leaves the old export or the new one, never a mix and never nothing."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from micro_diffusion.errors import DataError, UsageError
from micro_diffusion.exported import FILES, ExportMismatchError, export_model, load_exported, load_weights
from micro_diffusion.models import create_dit
from micro_diffusion.utils import atomic
from micro_diffusion.utils.atomic import atomic_folder, replace_folder, write_text_atomic

CAPTION_DIM = 16


def folder(path: Path, **files: str) -> Path:
    """A folder holding the given text files."""
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(path.iterdir())}


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def exchange_works(tmp_path: Path) -> bool:
    """Whether this filesystem swaps folders with renameat2 (the kill test's guarantee needs it)."""
    a, b = folder(tmp_path / "probe_a"), folder(tmp_path / "probe_b")
    ok = sys.platform.startswith("linux") and atomic.exchange(a, b)
    atomic.remove(a)
    atomic.remove(b)
    return ok


def no_exchange(*_args) -> None:
    raise OSError(errno.ENOSYS, "renameat2 is not available here")


# ---------------------------------------------------------------- replace_folder and write_text_atomic
def test_replace_folder_first_write_renames(tmp_path):
    new = folder(tmp_path / ".m.tmp", a="new")
    assert replace_folder(new, tmp_path / "m") == "rename"
    assert contents(tmp_path / "m") == {"a": "new"} and not new.exists()


def test_replace_folder_swaps_with_renameat2_and_removes_the_old(tmp_path):
    if not exchange_works(tmp_path):
        pytest.skip("no renameat2 RENAME_EXCHANGE here (not Linux, or this filesystem refuses it)")
    folder(tmp_path / "m", a="old", b="old only")
    new = folder(tmp_path / ".m.tmp", a="new")
    assert replace_folder(new, tmp_path / "m") == "exchange"
    assert contents(tmp_path / "m") == {"a": "new"}  # replaced whole: the old folder's other file is gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_replace_folder_falls_back_to_two_renames_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", no_exchange)
    folder(tmp_path / "m", a="old")
    assert replace_folder(folder(tmp_path / ".m.tmp", a="new"), tmp_path / "m") == "fallback"
    assert contents(tmp_path / "m") == {"a": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_fallback_puts_the_old_folder_back_when_interrupted_between_its_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", no_exchange)
    rename = os.rename

    def interrupted(src, dst):
        if Path(src).name == ".m.tmp":
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", interrupted)
    folder(tmp_path / "m", a="old")
    with pytest.raises(KeyboardInterrupt):
        replace_folder(folder(tmp_path / ".m.tmp", a="new"), tmp_path / "m")
    assert contents(tmp_path / "m") == {"a": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.tmp", "m"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_interrupted_folder_write_leaves_the_old_folder_and_no_temporary_one(tmp_path, error):
    folder(tmp_path / "m", a="old")
    with pytest.raises(error), atomic_folder(tmp_path / "m") as tmp:
        (tmp / "a").write_text("half")
        raise error
    assert contents(tmp_path / "m") == {"a": "old"} and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_the_next_write_removes_leftovers_of_dead_writers_only(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    left = [f".m.tmp-{dead}-0badc0de", f"m.old-{dead}"]
    kept = [f".m.tmp-{alive}-0badc0de", ".m.tmp-x-0badc0de", "m.older", f".n.tmp-{dead}-0badc0de", "m.old-x"]
    for name in left + kept:
        folder(tmp_path / name, a="leftover")
    with atomic_folder(tmp_path / "m") as tmp:
        (tmp / "a").write_text("new")
    assert contents(tmp_path / "m") == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["m"])


def test_write_text_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old")
    write_text_atomic(path, "new")
    assert path.read_text() == "new"
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "caf\u00e9", encoding="ascii")  # fails part-way through writing
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# ---------------------------------------------------------------- exports
def tiny(width: int, seed: int) -> tuple[dict, dict, dict, np.ndarray]:
    """(raw weights, EMA weights, config, null caption) of a tiny MicroDiT of the given width."""
    torch.manual_seed(seed)
    net = create_dit("MicroDiT_Tiny_2", latent_size=4, caption_dim=CAPTION_DIM, width=width, depth=1, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=width)
    raw = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in raw.items()}
    config = {"preset": "MicroDiT_Tiny_2", "network": net.cfg.to_dict(), "sigma_data": 0.5,
              "encoders": {"caption_len": 4, "caption_dim": CAPTION_DIM}}
    null = np.random.default_rng(seed).standard_normal((4, CAPTION_DIM)).astype(np.float16)
    return raw, ema, config, null


def write(model: tuple, out: Path) -> Path:
    raw, ema, config, null = model
    return export_model(raw, ema, config, null, out)


def which(out: Path, models: dict[str, tuple], build: bool = False) -> str:
    """The name of the model the export at `out` holds whole (raw, EMA and null caption), or an AssertionError.

    build=True loads the networks too (load_exported, strict); else the weights as load_exported reads them.
    """
    raw_state, config = load_weights(out, use_ema=False)
    ema_state = load_weights(out, use_ema=True)[0]
    if build:
        raw_state, ema_state = (load_exported(out, use_ema=e)[0].state_dict() for e in (False, True))
    null = np.load(out / "null_caption.npy")
    for name, (raw, ema, _, want_null) in models.items():
        if config["network"]["width"] == raw["patch_embed.proj.weight"].shape[0]:
            assert raw_state.keys() == raw.keys() and ema_state.keys() == ema.keys(), f"tensors not {name}'s"
            assert all(torch.equal(raw_state[k], v) for k, v in raw.items()), f"raw weights not {name}'s"
            assert all(torch.equal(ema_state[k], v) for k, v in ema.items()), f"EMA weights not {name}'s"
            assert np.array_equal(null, want_null), f"null caption not {name}'s"
            return name
    raise AssertionError(f"{out} holds neither model: width {config['network']['width']}")


def test_an_export_records_its_files_and_replaces_another_whole(tmp_path):
    a, b = tiny(32, 0), tiny(64, 1)
    out = write(a, tmp_path / "m")
    record = json.loads((out / "config.json").read_text())[FILES]
    assert sorted(record) == ["ema.safetensors", "model.safetensors", "null_caption.npy"]
    assert record["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size
    write(b[:1] + (None,) + b[2:], out)  # no EMA this time: the old EMA file must not stay beside the new weights
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "null_caption.npy"]
    assert load_exported(out)[1]["network"]["width"] == 64 and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("other_width, found", [(64, r"\d+ bytes"), (32, "xxh64 [0-9a-f]+")])
def test_load_refuses_a_weights_file_of_another_export_naming_it(tmp_path, other_width, found):
    out, other = write(tiny(32, 0), tmp_path / "m"), write(tiny(other_width, 1), tmp_path / "other")
    (out / "ema.safetensors").write_bytes((other / "ema.safetensors").read_bytes())
    message = rf"{re.escape(str(out / 'ema.safetensors'))} does not belong to this export: .* the file has {found} "
    with pytest.raises(ExportMismatchError, match=message) as err:
        load_exported(out, use_ema=True)
    assert isinstance(err.value, DataError) and err.value.exit_code == 4
    if other_width == 32:  # same sizes: only the file that is read is hashed, and the raw one belongs here
        assert load_exported(out, use_ema=False)[1]["weights_file"] == "model.safetensors"
    else:  # sizes are checked whichever weights are asked for
        with pytest.raises(ExportMismatchError, match=message):
            load_exported(out, use_ema=False)


def test_an_export_without_recorded_files_still_loads(tmp_path):
    a = tiny(32, 0)
    out = write(a, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    del config[FILES]  # as exports written before the record, and imported or hand-copied ones
    (out / "config.json").write_text(json.dumps(config))
    assert which(out, {"a": a}, build=True) == "a"


def test_a_copy_without_its_ema_file_loads_the_raw_weights_and_a_missing_null_caption_is_named(tmp_path):
    out = write(tiny(32, 0), tmp_path / "m")
    (out / "ema.safetensors").unlink()  # left out of a copy to save space: nothing mismatched, the raw weights load
    assert load_exported(out)[1]["weights_file"] == "model.safetensors"
    (out / "null_caption.npy").unlink()
    with pytest.raises(ExportMismatchError, match="null_caption.npy is missing, but .*config.json records it"):
        load_exported(out)


def test_a_folder_that_is_no_export_is_not_replaced(tmp_path):
    folder(tmp_path / "m", notes="mine")
    with pytest.raises(UsageError, match="holds no exported model"):
        write(tiny(32, 0), tmp_path / "m")
    assert contents(tmp_path / "m") == {"notes": "mine"}


def test_load_names_the_old_export_a_fallback_kill_parked(tmp_path):
    out = write(tiny(32, 0), tmp_path / "m")
    parked = out.rename(tmp_path / f"m.old-{dead_pid()}")  # a kill between the fallback's two renames
    with pytest.raises(FileNotFoundError, match=f"previous one whole at {parked}"):
        load_exported(out)


def stop(pid: int, sig: int) -> None:
    """Send sig to a child and reap it; one that outlives a SIGINT by 30 s (a lock held at fork) is SIGKILLed."""
    os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.001)


@pytest.mark.slow
def test_a_killed_export_leaves_one_model_whole(tmp_path):
    """SIGKILL (and some SIGINT) at seeded random moments of an export over an export of another model."""
    if not exchange_works(tmp_path):
        pytest.skip("this filesystem has no renameat2 RENAME_EXCHANGE: the fallback has a window with no export")
    models = {"a": tiny(32, 0), "b": tiny(64, 1)}
    out = tmp_path / "models" / "m"
    write(models["a"], out)
    start = time.perf_counter()
    write(models["b"], out)
    span = 2 * (time.perf_counter() - start)  # kill moments spread over about twice one export's time
    write(models["a"], out)
    assert which(out, models, build=True) == "a"
    rng = random.Random(30)
    for attempt in range(30):
        current = which(out, models)
        other = "b" if current == "a" else "a"
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: signal readiness, export the other model, exit without pytest's clean-up
            code = 1
            try:
                os.close(ready_r)
                os.write(ready_w, b"1")
                write(models[other], out)
                code = 0
            finally:
                os._exit(code)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        time.sleep(rng.uniform(0, span))
        sig = signal.SIGINT if attempt % 5 == 4 else signal.SIGKILL
        stop(pid, sig)
        which(out, models)  # the folder exists and holds one model whole
        if sig == signal.SIGINT:  # Ctrl-C cleans up after itself
            assert not list(out.parent.glob(f".m.tmp-{pid}-*"))
    names = {p.name for p in out.parent.iterdir()}
    assert all(n == "m" or n.startswith(".m.tmp-") for n in names), names  # only the export and a killed one's temp
    assert which(out, models, build=True) in models  # the last survivor builds its network too
    write(models["a"], out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # the next export removes killed ones' leftovers
