"""`make gpu-check` at tiny size on CPU, with Composer and Streaming made unimportable as on a bare GPU box."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.bench_train as bench_train
from benchmarks.gpu_check import (
    STAGES,
    TINY_BATCH,
    Check,
    build,
    dense_peak_tflops,
    main,
    stage_settings,
    table,
    train_step,
)
from micro_diffusion.cost import prices
from micro_diffusion.recipe import load_recipe
from micro_diffusion.utils import devices

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("composer", "streaming")


def blocking_path(root: Path) -> str:
    """A folder of packages named like Composer and Streaming whose import fails, to put first on PYTHONPATH."""
    for name in BLOCKED:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this box')\n")
    return str(root)


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": blocking_path(tmp / "blocked"), "PYTHONUNBUFFERED": "1"}
    probe = subprocess.run([sys.executable, "-c", "import composer"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed on this box" in probe.stderr  # the blocking works
    args = [f"GPU_CHECK_PY={sys.executable}", f"GPU_CHECK_OUT={tmp / 'out'}", "GPU_CHECK_ARGS=--device cpu"]
    out = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "gpu-check", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, f"make gpu-check failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return json.loads((tmp / "out" / "gpu_check.json").read_text()), (tmp / "out" / "gpu_check.md").read_text()


@pytest.mark.slow
def test_every_measurement_recorded_without_errors(gpu_check):
    result, md = gpu_check
    records = result["records"]
    assert result["tiny"] and not [r for r in records if "error" in r]
    assert all(set(r) == {"name", "config", "value", "unit"} for r in records)
    names = {r["name"] for r in records}
    for name in ("attention_max_abs_diff", "moe_dispatch_max_abs_diff", "compile_first_call_s", "compile_speedup",
                 "sample_images_per_s", "moe_over_dense_ffn", "fluid_train_s_per_step", "fluid_train_mfu",
                 "fluid_sample_images_per_s"):
        assert name in names
    fluid = next(r for r in records if r["name"] == "fluid_train_s_per_step")["config"]
    assert fluid["recipe_preset"] == "Fluid_369M" and fluid["recipe_microbatch"] == 128  # tiny stands in for these
    assert md.count("\n| ") == len(records) + 2  # header, rule and one row per record


@pytest.mark.slow
def test_train_steps_follow_the_stage_recipes(gpu_check):
    records = gpu_check[0]["records"]
    steps = [r for r in records if r["name"] == "train_s_per_step"]
    assert [r["config"]["stage"] for r in steps] == list(STAGES)
    for r in steps:
        cfg = load_recipe(REPO / "recipes" / f"{r['config']['stage']}.yaml")
        assert r["config"]["mask_ratio"] == cfg["diffusion"]["mask_ratio"]
        assert r["config"]["resolution"] == cfg["data"]["resolution"]
        assert r["config"]["microbatch"] == TINY_BATCH and r["value"] > 0
        assert r["config"]["recipe_microbatch"] == cfg["train"]["device_microbatch"]  # 256 / 64 / 32 / 16
    # MFU on a CPU divides by a matmul peak measured once, so under load it may pass 1: check what holds at any
    # speed, that it is this step's FLOPs over its time over the peak of the dtype the step ran in
    mfu = [r for r in records if r["name"] == "train_mfu"]
    assert len(mfu) == 4
    for r, step in zip(mfu, steps, strict=True):
        c = r["config"]
        assert r["value"] == pytest.approx(c["tflop_per_step"] / step["value"] / c["peak_tflops"], rel=1e-9)
        assert c["dtype"] == gpu_check[0]["dtype"] and c["peak_source"] == f"measured {c['dtype']} matmul"
    fits = [r for r in records if r["name"] == "train_fits_80gb"]
    peaks = [r["value"] for r in records if r["name"] == "train_peak_memory"]
    for r, peak in zip(fits, peaks, strict=True):
        assert r["value"] is True and r["config"]["predicted_gib"] > peak  # the sharded optimizer state is added


@pytest.mark.slow
def test_equalities_hold_within_tolerance(gpu_check):
    for r in gpu_check[0]["records"]:
        if r["name"].endswith("max_abs_diff"):
            assert 0 <= r["value"] <= r["config"].get("tolerance", 5e-2), r


def test_a_failure_is_recorded_and_the_rest_runs_until_the_budget_is_spent():
    check = Check(budget_s=3600)
    check.run("broken", {"k": 1}, lambda: {}["missing"])
    check.run("fine", {}, lambda: check.add("fine", {}, 1.0, "s"))
    assert [r["name"] for r in check.records] == ["broken", "fine"]
    assert "KeyError" in check.records[0]["error"] and check.failed() == [check.records[0]]
    check.budget_s = 0.0
    check.run("late", {}, lambda: check.add("late", {}, 2.0, "s"))
    assert check.records[-1]["error"].startswith("skipped") and len(check.failed()) == 1
    assert "**KeyError" in table(check.records)


@pytest.mark.parametrize("native_bf16,name", [(False, "fp32"), (True, "bf16")])
def test_the_cpu_check_runs_in_the_dtype_the_cpu_does_fast_and_divides_by_its_peak(monkeypatch, native_bf16, name):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native_bf16)  # the machine's answer, mocked
    measured, autocasts = [], []
    monkeypatch.setattr(prices, "matmul_peak_tflops",
                        lambda device, dtype, size, seconds: measured.append(dtype) or 0.05)
    real_autocast = bench_train.autocast
    monkeypatch.setattr(bench_train, "autocast", lambda device, dtype: autocasts.append(dtype) or real_autocast(
        device, dtype))
    cpu = torch.device("cpu")
    dtype = devices.compute_dtype(cpu)
    peak = dense_peak_tflops(cpu, dtype)
    assert dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
    assert measured == [dtype] and peak == (0.05, f"measured {name} matmul")  # the peak of the precision that runs
    s, check = stage_settings(STAGES[0], tiny=True), Check(budget_s=3600)
    train_step(check, build(s, cpu), s, cpu, dtype, peak, repeats=1)
    assert autocasts and set(autocasts) == {dtype}  # the step ran in that dtype
    by_name = {r["name"]: r for r in check.records}
    assert by_name["train_s_per_step"]["config"]["dtype"] == name
    assert by_name["train_mfu"]["config"]["peak_tflops"] == 0.05


def test_the_tiny_flag_is_renamed_to_quick(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--tiny"])
    assert exc.value.code == 2 and "--tiny was renamed: use --quick" in capsys.readouterr().err
