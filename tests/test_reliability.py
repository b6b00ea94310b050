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
from micro_diffusion.training.cli import DATA_EXIT, train
from micro_diffusion.utils.jsonl import read_jsonl

RECIPE = str(REPO / "recipes" / "demo_masked.yaml")
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
    rc = train(RECIPE, tiny_overrides(tmp_path / "data", tmp_path / "runs", steps=steps) + list(extra))
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
