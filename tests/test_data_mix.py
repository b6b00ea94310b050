"""`micro-diffusion data mix`: samples and shares per stream from the MDS indexes, what is missing, the paper's mix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import REPO

from micro_diffusion.cli import main
from micro_diffusion.data.mix import PAPER_MIX, paper_source


def write_stream(folder: Path, n: int) -> None:
    """An MDS dataset of n tiny samples (the mix reads only its index)."""
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"id": "str"}, size_limit=1 << 10) as w:
        for i in range(n):
            w.write({"id": f"{folder.name}-{i:04d}" + "x" * 100})  # several shards: counts are summed over them


def run_mix(capsys, *argv: str) -> tuple[int, str]:
    code = main(["data", "mix", *map(str, argv)])
    return code, capsys.readouterr().out


def test_mix_counts_shares_and_missing_streams(tmp_path, capsys):
    root = tmp_path / "latents"
    for name, n in (("sa1b", 30), ("cc12m", 20), ("journeydb", 10)):
        write_stream(root / name, n)
    (root / "diffusiondb").mkdir()
    (root / "diffusiondb" / "index.json").write_text(json.dumps({"version": 2, "shards": []}))  # empty
    recipe = REPO / "recipes" / "res256_masked.yaml"  # streams sa1b, cc12m, textcaps, journeydb, diffusiondb

    code, out = run_mix(capsys, recipe, "--data-root", root, "--json")
    report = json.loads(out)
    assert code == 1 and report["data_root"] == str(root) and report["share_by"] == "samples"
    rows = {Path(r["local"]).name: r for r in report["streams"]}
    assert {k: (r["samples"], r["status"]) for k, r in rows.items()} == {
        "sa1b": (30, "ok"), "cc12m": (20, "ok"), "textcaps": (None, "missing"), "journeydb": (10, "ok"),
        "diffusiondb": (0, "empty")}
    assert rows["sa1b"]["share"] == pytest.approx(0.5) and rows["journeydb"]["share"] == pytest.approx(1 / 6)
    assert report["total_samples"] == 60 and len(report["missing"]) == 2
    assert rows["diffusiondb"]["paper_samples"] == PAPER_MIX["diffusiondb"]
    assert sum(r["paper_share"] for r in rows.values()) == pytest.approx(1.0)
    assert report["paper_sources_not_read"] == []

    write_stream(root / "textcaps", 5)
    write_stream(tmp_path / "dd", 35)
    (root / "diffusiondb" / "index.json").unlink()
    (root / "diffusiondb").rmdir()
    (root / "diffusiondb").symlink_to(tmp_path / "dd")
    code, table = run_mix(capsys, recipe, "--data-root", root)
    assert code == 0 and "missing" not in table
    assert "data.streams[4]" in table and f"{PAPER_MIX['diffusiondb']:,}" in table and "35" in table


def test_mix_proportions_subsets_and_names(tmp_path, capsys):
    root = tmp_path / "root"
    write_stream(root / "jdb", 4)
    write_stream(root / "cc12m_512", 12)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(f"base: {REPO / 'recipes' / 'res256_masked.yaml'}\n"
                      f"data: {{root: {root}, streams: [{{local: jdb, proportion: 3}}, "
                      f"{{local: cc12m_512, proportion: 1}}]}}\n")
    code, out = run_mix(capsys, recipe, "--json")
    report = json.loads(out)
    assert code == 0 and report["share_by"] == "proportion"
    assert [(r["paper_source"], r["samples"], r["share"]) for r in report["streams"]] == [
        ("journeydb", 4, 0.75), ("cc12m", 12, 0.25)]
    paper = PAPER_MIX["journeydb"] / (PAPER_MIX["journeydb"] + PAPER_MIX["cc12m"])
    assert report["streams"][0]["paper_share"] == pytest.approx(paper)
    assert report["paper_sources_not_read"] == ["diffusiondb", "sa1b", "textcaps"]
    assert [paper_source(p) for p in ("data/latents/SA-1B/", "x/diffdb", "photos", None)] == [
        "sa1b", "diffusiondb", None, None]

    assert main(["data", "mix", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # the stream root was a second positional argument
        main(["data", "mix", str(recipe), str(root)])
    assert stop.value.code == 2 and f"use --data-root {root}" in capsys.readouterr().err
