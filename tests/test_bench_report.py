"""The benchmark report: MFU against the GPU's table peak where there is one, never on CPU."""
import torch

from benchmarks.bench_train import spec_peak_gflops
from benchmarks.report import train_table


def train_result(device_peak: float | None) -> dict:
    """A train.json as bench_train writes it, one preset at three mask ratios plus naive masking."""
    runs = [dict(preset="MicroDiT_XL_2", masking=m, mask_ratio=r, seconds=s, images_per_s=8 / s, gflop_per_image=g,
                 gflop_per_s=8 * g / s, share_of_peak=8 * g / s / 400.0, peak_memory_mb=100.0,
                 mfu=8 * g / s / device_peak if device_peak else None)
            for m, r, s, g in (("deferred", 0.75, 0.1, 280.0), ("deferred", 0.0, 0.2, 700.0),
                               ("naive", 0.75, 0.08, 170.0))]
    speedups = [dict(preset="MicroDiT_XL_2", time_speedup=2.0, flop_ratio=2.5, speedup_over_flop_ratio=0.8,
                     deferred_over_naive_seconds=1.25)]
    moe = dict(dim=1024, hidden=768, tokens=256, batch=8, dense_hidden=1536, moe_over_dense=1.1)
    return dict(device="NVIDIA H100", dtype="bfloat16 autocast", matmul_peak_gflops=400.0,
                device_peak_gflops=device_peak, latent=32, caption=[77, 1024], runs=runs, speedups=speedups, moe=moe)


def test_gpu_rows_carry_mfu_against_the_table_peak():
    lines = train_table(train_result(989_000.0))
    header = next(line for line in lines if line.startswith("| preset | masking"))
    assert "| MFU |" in header
    row = next(line for line in lines if "| deferred | 0.75 |" in line)
    assert row.split(" | ")[8] == "2.3%"  # 8 x 280 GFLOP in 0.1 s = 22,400 GFLOP/s of 989,000
    assert all(line.count("|") == header.count("|") for line in lines if "| deferred |" in line or "| naive |" in line)


def test_cpu_tables_have_no_mfu_column():
    assert spec_peak_gflops(torch.device("cpu")) is None
    assert not any("MFU" in line for line in train_table(train_result(None)))


def test_the_memory_models_prediction_is_set_against_the_measured_peak():
    result = train_result(None)
    result["runs"][0]["predicted_memory_mb"] = 110.0  # the measured peak of that row is 100 MB
    (line,) = [x for x in train_table(result) if "memory model" in x]
    assert "predicts 110 MB (+10% of the measured peak" in line and line.startswith("- MicroDiT_XL_2 at 0.75")
    assert not any("memory model" in x for x in train_table(train_result(None)))
