"""One writer per folder (utils.folder_lock): a second job is refused at once naming the holder, a killed holder never
blocks a rerun, and a second `train` stops before Composer is imported while the first finishes as if alone."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import REPO, tiny_overrides, write_shards

from micro_diffusion.errors import Busy, MicroDiffusionError, UsageError
from micro_diffusion.utils.folder_lock import hold, holder, holding
from micro_diffusion.utils.run_folder import LOCK, lock_file

HOLDER = """\
import sys
from micro_diffusion.utils.folder_lock import hold
with hold(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
"""

# Runs the console script's main and records, at exit, which project and Composer modules were ever imported.
RECORDER = """\
import atexit, json, sys
from pathlib import Path
atexit.register(lambda: Path(sys.argv[1]).write_text(json.dumps(sorted(
    m for m in sys.modules if m.split(".")[0] in ("composer", "micro_diffusion")))))
from micro_diffusion.cli import main
sys.exit(main(sys.argv[2:]))
"""

# Runs the console script's main with training.stage._fit gated: it signals READY (the lock is held by then) and waits
# for GO before training, so a second job can be tried while this one holds the run folder.
GATED = """\
import sys, time
from pathlib import Path
import micro_diffusion.training.stage as stage
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
fit = stage._fit
def gated(*args):
    ready.write_text("ready")
    while not go.exists():
        time.sleep(0.02)
    fit(*args)
stage._fit = gated
from micro_diffusion.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)
    return env


def _start_holder(tmp_path: Path, folder: Path, what: str = "train") -> subprocess.Popen:
    """Another process holding `folder`'s lock (returns once it holds it)."""
    script = tmp_path / "holder_job.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), what], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held", "the holder did not take the lock"
    return proc


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until `path` exists (an event the process signals), failing fast when the process ended first."""
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before writing {path}"
        assert time.monotonic() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.02)


def test_second_holder_in_another_process_is_refused_naming_pid_and_command(tmp_path):
    folder = tmp_path / "run"
    proc = _start_holder(tmp_path, folder)
    try:
        record = holder(folder / LOCK)
        assert record["pid"] == proc.pid and "holder_job.py" in record["command"] and record["what"] == "train"
        assert record["host"] and record["since"]
        with pytest.raises(Busy) as refused:
            with hold(folder, "train"):
                pytest.fail("a second holder must not run")
        message = str(refused.value)
        assert f"pid {proc.pid}" in message and "holder_job.py" in message and str(folder) in message
        assert isinstance(refused.value, UsageError) and refused.value.exit_code == 2
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert not (folder / LOCK).exists(), "a clean release removes the lock file"
    with hold(folder, "train") as path:  # free again once the holder exited
        assert holder(path)["pid"] == os.getpid()


def test_a_lock_left_by_kill_9_never_blocks_a_rerun(tmp_path):
    folder = tmp_path / "run"
    proc = _start_holder(tmp_path, folder)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert holder(folder / LOCK)["pid"] == proc.pid, "the killed holder's record stays behind"
    with hold(folder, "train") as path:  # at once: the kernel released the lock with the process
        assert path == folder / LOCK and holder(path)["pid"] == os.getpid() and "holder_job.py" not in path.read_text()
    assert not (folder / LOCK).exists()


def test_one_process_cannot_hold_a_folder_twice_and_other_folders_are_free(tmp_path):
    with hold(tmp_path / "a", "train"):
        with pytest.raises(Busy, match=f"pid {os.getpid()}"):
            with hold(tmp_path / "a", "export"):
                pass
        with hold(tmp_path / "b", "train"):
            pass


def test_a_lock_beside_the_folder_survives_the_folder_being_swapped(tmp_path):
    target = tmp_path / "exports" / "tiny"
    assert lock_file(target, beside=True) == tmp_path / "exports" / f".tiny{LOCK}"
    assert lock_file(str(target) + "/", beside=True) == lock_file(target, beside=True)
    with hold(target, "export", beside=True) as path:
        target.mkdir()
        target.rename(tmp_path / "exports" / "old")  # an atomic export replaces the folder whole
        target.mkdir()
        with pytest.raises(Busy, match="export pid"):
            with hold(target, "export", beside=True):
                pass
        assert not (target / LOCK).exists() and path.parent == target.parent
    assert not path.exists()


def test_a_failed_job_leaves_no_new_folder_and_an_unwritable_folder_is_one_error(tmp_path):
    with pytest.raises(ValueError, match="early"):
        with hold(tmp_path / "new" / "run", "train"):
            raise ValueError("early")
    assert list(tmp_path.iterdir()) == [], "the folders hold created for the job are removed when still empty"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MicroDiffusionError, match="cannot train there"):
        with hold(tmp_path / "file", "train"):
            pass


def test_ranks_other_than_0_hold_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with hold(tmp_path / "run", "train") as path:
        assert path is None and not (tmp_path / "run").exists()


def test_holding_locks_the_named_argument(tmp_path):
    @holding("convert")
    def step(input: str, out: Path) -> dict:
        """A step that writes `out`."""
        return holder(out / LOCK)

    assert step("x", out=tmp_path / "o")["what"] == "convert" and step.__doc__ == "A step that writes `out`."
    with hold(tmp_path / "o", "convert"):
        with pytest.raises(Busy):
            step("x", tmp_path / "o")


def test_convert_precompute_and_eval_coco_refuse_a_held_output_before_reading_their_inputs(tmp_path):
    from data_prep.convert import convert
    from data_prep.precompute import precompute
    from micro_diffusion.eval.coco import coco

    out = tmp_path / "out"
    shards, run = tmp_path / "shards", tmp_path / "run"  # inputs that pass the argument checks, never read
    shards.mkdir()
    run.mkdir()
    with hold(out, "another convert", beside=True):
        with pytest.raises(Busy, match=f"another convert pid {os.getpid()}"):
            convert(tmp_path / "missing", out, "folder", workers=0)
        with pytest.raises(Busy, match="another convert"):
            precompute(shards, out, [64], vae="missing", text_encoder="missing", caption_len=8)
    with hold(out, "another eval"):
        with pytest.raises(Busy, match="another eval"):
            coco(run, out, tmp_path / "captions.json", tmp_path / "images")
    assert sorted(tmp_path.iterdir()) == [run, shards], "the refused jobs created nothing"


def test_train_in_a_held_run_folder_stops_before_fitting(tmp_path, monkeypatch):
    """The step function: Busy from train(), and the fit (where Composer is imported) never starts."""
    from micro_diffusion.recipe import parse_overrides
    from micro_diffusion.training import stage

    data = tmp_path / "data"
    write_shards(data / "latents", 16)
    overrides = parse_overrides(tiny_overrides(data, tmp_path / "runs"))
    monkeypatch.setattr(stage, "_fit", lambda *a: pytest.fail("the fit must not start"))
    out = tmp_path / "run"
    proc = _start_holder(tmp_path, out)
    try:
        with pytest.raises(Busy, match=f"pid {proc.pid}"):
            stage.train("demo_masked.yaml", overrides, out)
        assert "# all inputs found" in stage.dry_run("demo_masked.yaml", overrides, out), "a dry run takes no lock"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert sorted(p.name for p in out.iterdir()) == [LOCK], "nothing written beside the holder's lock file"


@pytest.mark.slow
def test_second_train_cli_exits_naming_the_holder_before_composer_is_imported(tmp_path):
    data = tmp_path / "data"
    write_shards(data / "latents", 16)
    out = tmp_path / "run"
    recorder, modules = tmp_path / "recorder.py", tmp_path / "modules.json"
    recorder.write_text(RECORDER)
    proc = _start_holder(tmp_path, out)
    try:
        second = subprocess.run([sys.executable, str(recorder), str(modules), "train", "demo_masked.yaml",
                                 *tiny_overrides(data, tmp_path / "runs"), "--out", str(out)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert second.returncode == Busy.exit_code == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("micro-diffusion train: "), second.stderr[-3000:]
    assert f"pid {proc.pid}" in lines[0] and "holder_job.py" in lines[0] and "Traceback" not in second.stderr
    imported = json.loads(modules.read_text())
    assert "micro_diffusion.training.stage" in imported, "the recorder saw the train step's imports"
    assert not [m for m in imported if m.split(".")[0] == "composer"], "Composer imported before the lock refused"
    assert "micro_diffusion.training.builder" not in imported and "micro_diffusion.data.dataset" not in imported
    assert sorted(p.name for p in out.iterdir()) == [LOCK], "no config.yaml or checkpoint written"


def _final_weights(run: Path, steps: int) -> dict[str, torch.Tensor]:
    """The network weights of a run's last checkpoint."""
    return torch.load(run / "checkpoints" / f"ep0-ba{steps}-rank0.pt", map_location="cpu",
                      weights_only=False)["state"]["model"]


@pytest.mark.slow
def test_first_train_holds_the_folder_and_finishes_as_if_alone(tmp_path):
    data = tmp_path / "data"
    write_shards(data / "latents", 48)
    steps = 4
    args = ["train", "demo_masked.yaml", *tiny_overrides(data, tmp_path / "runs", steps=steps)]
    gated, ready, go = tmp_path / "gated.py", tmp_path / "ready", tmp_path / "go"
    gated.write_text(GATED)
    first = subprocess.Popen([sys.executable, str(gated), str(ready), str(go), *args, "--out", str(tmp_path / "run")],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        _wait_for(ready, first)  # the first run holds the folder and waits before its fit
        second = subprocess.run([sys.executable, "-m", "micro_diffusion.cli", *args, "--out", str(tmp_path / "run")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr[-3000:]
        assert "gated.py" in second.stderr and "Traceback" not in second.stderr
        go.write_text("go")
        log, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, log[-3000:]
    assert not (tmp_path / "run" / LOCK).exists()
    alone = subprocess.run([sys.executable, "-m", "micro_diffusion.cli", *args, "--out", str(tmp_path / "alone")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert alone.returncode == 0, alone.stderr[-3000:]
    held, straight = _final_weights(tmp_path / "run", steps), _final_weights(tmp_path / "alone", steps)
    assert held.keys() == straight.keys()
    for key, value in straight.items():
        assert torch.allclose(held[key], value, rtol=1e-5, atol=1e-6), key
    start = _final_weights(tmp_path / "alone", 2)
    assert any(not torch.allclose(start[k], v) for k, v in straight.items()), "training must have moved the weights"

    from micro_diffusion.training.export import export_run

    export = tmp_path / "exports" / "tiny"
    with hold(export, "another export", beside=True):
        with pytest.raises(Busy, match="another export"):
            export_run(tmp_path / "run", export)
    assert not export.exists()
    export_run(tmp_path / "run", export)
    assert export.is_dir() and not lock_file(export, beside=True).exists()
