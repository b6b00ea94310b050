"""`bench_train --reference DIR`: a checkout whose package is also named micro_diffusion, timed beside ours."""
from __future__ import annotations

import json
import textwrap

import pytest

import micro_diffusion
from benchmarks import bench_train
from benchmarks.reference import REFERENCE_PACKAGE, load_reference_models
from benchmarks.report import train_table
from micro_diffusion.utils.devices import compute_dtype, dtype_name

# A stand-in for the reference's micro_diffusion/models/dit.py: its call convention (x, t, y (N, 1, L, D),
# mask_ratio) -> {'sample', 'mask' (N, T) float, 1 = dropped}, a network of its own inside, and a relative import.
STANDIN = '''
import torch
from torch import nn
from .layers import WIDTH

class DiT(nn.Module):
    def __init__(self, caption_channels, input_size):
        super().__init__()
        self.patch_size, self.side = 2, input_size
        self.proj = nn.Linear(4, 4)
        self.cap = nn.Linear(caption_channels, WIDTH)

    def forward(self, x, t, y, mask_ratio=0.0):
        assert y.dim() == 4 and y.shape[1] == 1
        N, T = x.shape[0], (self.side // 2) ** 2
        out = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + self.cap(y).mean() + t.view(-1, 1, 1, 1)
        mask = torch.zeros(N, T, device=x.device)
        mask[:, : int(T * mask_ratio)] = 1
        return {"sample": out, "mask": mask if mask_ratio > 0 else None}

def MicroDiT_Tiny_2(caption_channels=1024, input_size=32):
    return DiT(caption_channels, input_size)
'''


def standin_checkout(root):
    models = root / "micro_diffusion" / "models"
    models.mkdir(parents=True)
    (root / "micro_diffusion" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (models / "dit.py").write_text(textwrap.dedent(STANDIN))
    (models / "layers.py").write_text("WIDTH = 8\n")
    return root


@pytest.mark.slow
def test_reference_loads_under_its_own_name_and_runs_beside_ours(tmp_path):
    checkout = standin_checkout(tmp_path / "ref")
    dit = load_reference_models(checkout)
    assert dit.__name__ == f"{REFERENCE_PACKAGE}.dit" and str(checkout) in dit.__file__
    assert str(tmp_path) not in micro_diffusion.__file__  # our package is untouched
    result = bench_train.main(["--quick", "--presets", "MicroDiT_Tiny_2", "--reference", str(checkout),
                               "--repeats", "2", "--out", str(tmp_path / "out")])
    (row,) = result["reference"]
    assert row["preset"] == "MicroDiT_Tiny_2" and row["mask_ratio"] == bench_train.SIDE_BY_SIDE_MASK
    assert len(row["ours_all"]) == len(row["reference_all"]) == 2
    assert row["ours_seconds"] == min(row["ours_all"]) and row["reference_seconds"] == min(row["reference_all"])
    assert row["speedup"] == row["reference_seconds"] / row["ours_seconds"]
    assert row["reference_params"] < row["ours_params"]  # the stand-in's own network was timed, not ours
    saved = json.loads((tmp_path / "out" / "train_quick.json").read_text())
    assert saved["reference"][0]["speedup"] == row["speedup"]
    assert any("reference / ours" in line for line in train_table(saved))


@pytest.mark.slow
def test_without_reference_no_ratio_is_reported(tmp_path):
    result = bench_train.main(["--quick", "--presets", "MicroDiT_Tiny_2", "--out", str(tmp_path)])
    assert "reference" not in result and not any("reference" in line for line in train_table(result))
    assert result["dtype"] == dtype_name(compute_dtype("cpu"))  # the result says which dtype ran


def test_the_batch_flag_is_renamed_to_batch_size(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_train.main(["--quick", "--batch", "4"])
    assert exc.value.code == 2 and "--batch was renamed: use --batch-size" in capsys.readouterr().err


def test_a_folder_without_the_reference_network_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="micro_diffusion/models/dit.py"):
        load_reference_models(tmp_path)
