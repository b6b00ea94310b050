"""The benchmarks' live-tensor counter (common.LiveTensorPeak): each storage once, freed when it dies, backward seen."""
import torch

from benchmarks.common import LiveTensorPeak
from benchmarks.report import checkpointing_table

MB = 1 << 20


def test_counts_each_storage_once_until_it_dies() -> None:
    before = torch.ones(MB, dtype=torch.uint8)  # exists before: not counted
    with LiveTensorPeak() as live:
        a = torch.zeros(MB, dtype=torch.uint8)
        view = a[16:]  # a view of a's storage: no new bytes
        b = a + 1
        assert live.live == 2 * MB
        del a, b
        assert live.live == MB  # the view keeps a's storage alive
        del view
        c = before * 2
    assert live.live == MB and live.peak == 2 * MB
    assert c.untyped_storage().nbytes() == MB


def test_sees_the_backward_and_its_gradients() -> None:
    x = torch.randn(256, 256, requires_grad=True)  # 256 KiB
    with LiveTensorPeak() as live:
        (x.exp() * 2).sum().backward()
    assert x.grad is not None
    assert live.live >= x.grad.untyped_storage().nbytes()  # the gradient, made by the backward, is still alive
    assert live.peak >= 2 * x.untyped_storage().nbytes()  # exp's output, saved for backward, and its gradient


def test_report_shows_the_live_column_and_tolerates_older_results() -> None:
    run = dict(preset="MicroDiT_Tiny_2", batch=8, mask_ratio=0.0, checkpointing=True, seconds=2.0,
               peak_memory_mb=1000.0, predicted_memory_mb=900.0)
    result = dict(device="cpu", dtype="bf16", latent=32, runs=[{**run, "live_peak_mb": 700.0}, run],
                  comparison=[dict(mask_ratio=0.0, time_ratio=1.3, peak_saved_mb=10.0)])
    lines = checkpointing_table(result)
    rows = [line for line in lines if line.startswith("| 0.00 |")]
    assert rows[0].endswith("| -10% | 700 |") and rows[1].endswith("| -10% | - |")
    assert all(row.count("|") == lines[2].count("|") for row in rows)
