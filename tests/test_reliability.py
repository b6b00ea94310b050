"""Damaged data names itself: truncated and corrupted shards, bad samples (error or skip-and-count), and resumed logs
that hold every step once. All on real shards on disk, through the train command's own function."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import REPO, RESOLUTION, tiny_overrides, write_shards  # noqa: I001

from micro_diffusion.cli import main as cli_main
from micro_diffusion.data.integrity import check_folder
from micro_diffusion.errors import DataError
from micro_diffusion.utils.jsonl import read_jsonl

RECIPE = str(REPO / "recipes" / "demo_masked.yaml")
DATA_EXIT = DataError.exit_code
LATENTS = f"latents_{RESOLUTION}"


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    """64 samples in several shards, with xxh64 hashes in the index (as precompute writes them)."""
    write_shards(tmp_path / "data" / "latents", 64)
    return tmp_path / "data" / "latents"


def shard_files(root: Path) -> list[Path]:
    return sorted(root.glob("*.mds"))


def poison(root: Path, index: int, column: str = LATENTS) -> Path:
    """Overwrite sample `index`'s `column` bytes in its shard with 0xFF (float16 NaN), keeping the file's size.

    Latents are unique to their sample; caption embeddings repeat, so the copy nearest the sample's latents is it.
    """
    from streaming.base.local import LocalDataset

    sample = LocalDataset(str(root))[index]
    anchor, raw = (np.asarray(sample[c]).tobytes() for c in (LATENTS, column))
    for path in shard_files(root):
        data = path.read_bytes()
        near = data.find(anchor)
        if near >= 0:
            hits, at = [], data.find(raw)
            while at >= 0:
                hits.append(at)
                at = data.find(raw, at + 1)
            at = min(hits, key=lambda h: abs(h - near))
            path.write_bytes(data[:at] + b"\xff" * len(raw) + data[at + len(raw):])
            return path
    raise AssertionError(f"sample {index} not found in {root}")


def run_train(tmp_path: Path, capsys, *extra: str, steps: int = 4) -> tuple[int, str]:
    rc = cli_main(["train", RECIPE, *tiny_overrides(tmp_path / "data", tmp_path / "runs", steps=steps), *extra])
    return rc, capsys.readouterr().err


def test_truncated_shard_stops_before_training_naming_the_shard(tmp_path, shards, capsys):
    victim = shard_files(shards)[1]
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])  # a full disk, a killed copy
    rc, err = run_train(tmp_path, capsys)
    assert rc == DATA_EXIT == 4
    assert "Traceback" not in err and f"damaged shard {victim}" in err
    assert f"expected {size} bytes, found {size // 2}" in err and "copy it again" in err
    assert not (tmp_path / "runs" / "demo_masked" / "checkpoints").exists(), "nothing trained"
    assert cli_main(["data", "verify", str(shards)]) == 1
    assert f"damaged shard {victim}" in capsys.readouterr().err


@pytest.mark.slow
def test_corrupted_shard_is_bad_data_not_a_bad_learning_rate(tmp_path, shards, capsys):
    assert cli_main(["data", "verify", str(shards)]) == 0
    assert "shards check (sizes and hashes)" in capsys.readouterr().out
    victim = poison(shards, 21)  # bit rot: the size stays, the bytes are NaN
    assert check_folder(shards) == []  # the size check cannot see it

    # The default size check lets it through; the loader's worker names the sample before any forward pass.
    rc, err = run_train(tmp_path, capsys, "data.num_workers=1", "train.max_duration=1ep")
    assert rc == DATA_EXIT and "Traceback" not in err and "non-finite training loss" not in err
    line = next(x for x in err.splitlines() if "bad sample" in x)
    assert f"stream {shards}, shard {victim.name}" in line and "'s21'" in line
    assert f"{LATENTS} holds" in line and "non-finite values" in line and "data.skip_bad_samples=true" in line

    # data.verify=hashes finds it before training starts; `data verify` names it with both hashes.
    rc, err = run_train(tmp_path, capsys, "data.verify=hashes")
    assert rc == DATA_EXIT and f"damaged shard {victim}: expected xxh64 " in err and "(corrupted)" in err
    assert cli_main(["data", "verify", str(shards)]) == 1
    out = capsys.readouterr()
    assert f"damaged shard {victim}" in out.err and f"{len(shard_files(shards)) - 1} of" in out.out


def test_verify_usage_errors_exit_2(tmp_path, capsys):
    assert cli_main(["data", "verify", str(tmp_path)]) == 2
    assert f"no MDS index at {tmp_path / 'index.json'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli_main(["data", "verify"])
    assert stop.value.code == 2


@pytest.mark.slow
def test_skip_bad_samples_replaces_counts_and_lists_them(tmp_path, shards, capsys):
    bad = {5, 6, 40}
    for i in bad:
        poison(shards, i, "caption_emb" if i == 40 else LATENTS)
    rc, err = run_train(tmp_path, capsys, "data.skip_bad_samples=true", "train.max_duration=1ep", steps=8)
    assert rc == 0, err
    run = tmp_path / "runs" / "demo_masked"
    listed = read_jsonl(run / "bad_samples.jsonl")
    assert sorted(r["id"] for r in listed) == sorted(f"s{i}" for i in bad)  # an epoch reads each index once
    assert {r["id"]: r["problem"].split(" ")[0] for r in listed}["s40"] == "caption_emb"
    assert all(r["stream"] == str(shards) and r["shard"].endswith(".mds") for r in listed)
    rows = read_jsonl(run / "metrics.jsonl")
    assert sum(r.get("data/bad_samples", 0) for r in rows) == len(bad)
    assert len([r for r in rows if "loss/train/total" in r]) == 64 // 8, "batches keep their size"

    from micro_diffusion.cost.report import write_report
    html = write_report([run]).read_text()
    assert "bad samples skipped" in html and f"<td>{len(bad)}</td>" in html


def test_skipping_depends_on_the_data_alone(shards):
    from micro_diffusion.data.loader import build_dataloader

    poison(shards, 9)
    reads = []
    for _ in range(2):  # two loaders, one after the other (Streaming allows one per folder at a time)
        loader = build_dataloader([{"local": str(shards)}], batch_size=8, resolution=RESOLUTION, shuffle=True,
                                  seed=1, num_workers=0, skip_bad_samples=True)
        reads.append([(b["id"], b["skipped"]) for b in loader])
        del loader
    assert reads[0] == reads[1]
    ids = [i for batch, _ in reads[0] for i in batch]
    assert "s9" not in ids and ids.count("s10") == 2, "s9's place is taken by the next sample, s10"
    listed = [r for _, skipped in reads[0] for per_sample in skipped for r in per_sample]
    assert [(r["id"], r["index"]) for r in listed] == [("s9", 9)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_check_on_the_bits_agrees_with_numpy(dtype):
    from micro_diffusion.data.dataset import all_finite

    a = np.random.default_rng(0).standard_normal((77, 64)).astype(dtype)
    a[0, :3] = np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).tiny / 4  # extremes and a subnormal
    assert all_finite(a) and all_finite(a[:, ::3])
    for bad in (np.nan, np.inf, -np.inf):
        b = a.copy()
        b[40, 5] = bad
        assert not all_finite(b) and not all_finite(b[:, ::5])


def test_overwritten_sample_headers_name_the_sample_without_numpy_warnings(shards):
    import warnings

    from micro_diffusion.data.dataset import BadSampleError
    from micro_diffusion.data.loader import build_dataloader

    first = shard_files(shards)[0]
    data = first.read_bytes()
    first.write_bytes(data[:len(data) // 2] + b"\xff" * 8000 + data[len(data) // 2 + 8000:])  # headers hit too
    loader = build_dataloader([{"local": str(shards)}], batch_size=8, resolution=RESOLUTION, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Streaming's reader would warn of integer overflows in the sizes it reads
        with pytest.raises(BadSampleError, match=f"shard {first.name}, sample \\d+ .*(does not decode|non-finite)"):
            for _ in loader:
                pass


@pytest.mark.slow
def test_kill9_mid_interval_then_resume_logs_each_step_once(tmp_path, shards):
    steps = 12
    args = tiny_overrides(tmp_path / "data", tmp_path / "runs", steps=steps) + ["checkpoint.save_interval=4ba"]
    command = [str(Path(sys.executable).parent / "micro-diffusion"), "train", RECIPE, *args]
    run = tmp_path / "runs" / "demo_masked"
    metrics, latest = run / "metrics.jsonl", run / "checkpoints" / "latest-rank0.pt"
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (metrics.exists() and any(r["step"] >= 5 for r in read_jsonl(metrics))):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step 5 within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    resumed_from = int(Path(os.path.realpath(latest)).name.split("-ba")[1].split("-")[0])
    killed = read_jsonl(metrics)
    assert max(r["step"] for r in killed) > resumed_from, "the kill came after the last checkpoint's step"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 9, "loss/tra')  # a line torn by the kill

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(steps + 1)), "every step once, in order"
    superseded = read_jsonl(run / "metrics.superseded.jsonl")
    assert any("torn line" in r["superseded"] for r in superseded)
    redone = {r["step"]: r["loss/train/total"] for r in superseded if "loss/train/total" in r}
    assert redone and all(s > resumed_from for s in redone)
    loss = {r["step"]: r.get("loss/train/total") for r in rows}
    assert all(loss[s] == pytest.approx(v, rel=1e-6) for s, v in redone.items()), "the resumed run redid them"


HOLDER = """
import sys, time
from micro_diffusion.data.loader import build_dataloader
loader = build_dataloader([{{"local": {local!r}}}], batch_size=8, resolution={res}, num_workers=1)
next(iter(loader))
print("ready", flush=True)
time.sleep(600)
"""


def _streaming_files() -> set[Path]:
    from micro_diffusion.data.shm import FILELOCKS, SHM_DIR, SHM_TO_CLEAN, _by_prefix

    found = [*_by_prefix(SHM_DIR, tuple(SHM_TO_CLEAN)).values(), *_by_prefix(Path("/tmp"), FILELOCKS).values()]
    return {f for files in found for f in files}


def _mapped(pids: list[int] | None = None) -> set[tuple[str, int]]:
    """(path, inode) of the /dev/shm files the given processes (default: all readable ones) map."""
    out = set()
    for proc in [Path(f"/proc/{p}") for p in pids] if pids else Path("/proc").glob("[0-9]*"):
        try:
            lines = (proc / "maps").read_text().splitlines()
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        out |= {(f[5].strip(), int(f[4])) for f in map(str.split, lines, [None] * len(lines), [5] * len(lines))
                if len(f) == 6 and f[5].startswith("/dev/shm/")}
    return out


def _same_file(path: str, inode: int) -> bool:
    return os.path.exists(path) and os.stat(path).st_ino == inode


def _holder(local: Path) -> subprocess.Popen:
    """A process group holding a loader over `local` (main process and one worker), once it has read a batch."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(local=str(local), res=RESOLUTION)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # after any "removed ... left by dead processes" line of its own start
        if line.strip() == "ready":
            return proc
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"the loader process ended with code {proc.wait()}")


@pytest.mark.slow
def test_dead_runs_shared_memory_is_removed_and_a_new_run_does_not_stall(tmp_path, shards):
    from micro_diffusion.data.shm import _files_in_use, remove_dead_leftovers

    live = _holder(Path(write_shards(tmp_path / "other", 16, prefix="o")))
    held = _mapped([live.pid])
    try:
        before = _streaming_files()
        dead = _holder(shards)
        left = _mapped([dead.pid]) - held  # its own files (path, inode); other jobs on this machine come and go
        job = [int(p.name) for p in Path("/proc").glob("[0-9]*") if _pgid(int(p.name)) == dead.pid]
        os.killpg(dead.pid, signal.SIGKILL)  # the whole job, loader worker included: nothing unlinks anything
        dead.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _mapped(job) & left:
            assert time.monotonic() < deadline, "the killed processes still map their shared memory"
            time.sleep(0.1)
        assert left and all(_same_file(*f) for f in left), "SIGKILL leaves Streaming's entries behind"
        # Every StreamingDataset maps the entries of all others that existed when it started: a Streaming process
        # that another job here started meanwhile keeps them in use, and a cleaner must then leave them.
        probed = bool(_mapped() & left)

        run = subprocess.run([str(Path(sys.executable).parent / "micro-diffusion"), "train", RECIPE,
                              *tiny_overrides(tmp_path / "data", tmp_path / "runs", steps=2), "data.num_workers=1"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert all(_same_file(*f) for f in held), "a live job's memory is never touched"
        if not probed:
            assert "Streaming shared-memory files left by dead processes" in run.stdout
            assert not any(_same_file(*f) for f in left), "the dead job's memory is gone"
        live_prefixes = {Path(f).name[:6] for f in _files_in_use() if f.startswith("/dev/shm/")}
        own = [f for f in _streaming_files() - before if f.name[:6] not in live_prefixes]
        assert own == [], f"the run that ended normally left {own} (memory or file locks)"
    finally:
        os.killpg(live.pid, signal.SIGKILL)
        live.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_same_file(*f) for f in held) and time.monotonic() < deadline:
        remove_dead_leftovers()  # the live holder's memory, once its processes are gone
        time.sleep(0.1)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
