"""Compositional scenes: determinism per seed, metadata that matches the drawing, splits, the compose command and
its folder (read by data_prep.convert) and GenEval layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_convert import read_mds

from micro_diffusion.cli import main
from micro_diffusion.data.compose import compose
from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.geneval import read_layout, read_prompts_file, write_prompt, write_sample
from micro_diffusion.data.scenes import (
    GENEVAL_TASK_PROMPTS,
    NOVEL_PAIRS,
    PALETTE,
    SHAPES,
    TASKS,
    relative_position,
    split_prompt,
    split_scene,
)
from micro_diffusion.errors import UsageError


def test_scenes_are_deterministic_per_seed_and_differ_across_seeds():
    a = [render_scene(split_scene("train", 3, i)) for i in range(12)]
    b = [render_scene(split_scene("train", 3, i)) for i in range(12)]
    c = [render_scene(split_scene("train", 4, i)) for i in range(12)]
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # held out: the prompt list is fixed, the seed only changes the drawing
    assert [split_prompt("heldout", 0, i) for i in range(20)] == [split_prompt("heldout", 9, i) for i in range(20)]
    assert not np.array_equal(render_scene(split_scene("heldout", 0, 5)), render_scene(split_scene("heldout", 9, 5)))
    assert split_scene("train", 3, 5, size=32).objects[0].box[2] <= 32


@pytest.mark.parametrize("split", ["train", "heldout", "novel"])
def test_metadata_matches_what_was_drawn(split):
    for i in range(150):
        scene = split_scene(split, 1, i)
        meta, objs = scene.metadata, scene.objects
        includes = meta["include"]
        assert sum(r["count"] for r in includes) == len(objs) <= 4  # exactly the objects the prompt names
        start = 0
        for r in includes:
            group = objs[start : start + r["count"]]
            assert {o.shape for o in group} == {r["class"]}
            if "color" in r:
                assert {o.colour for o in group} == {r["color"]}
            start += r["count"]
        for r in meta.get("exclude", []):  # counting: the exclude is one more than the include
            assert r["count"] == len(objs) + 1 and meta["tag"] == "counting"
        for o in objs:  # fills are the named colour, jittered a little
            assert np.abs(np.subtract(o.fill, PALETTE[o.colour])).max() <= 10
        for j, a in enumerate(objs):  # boxes inside the image and apart from each other
            assert 0 <= a.box[0] < a.box[2] <= 64 and 0 <= a.box[1] < a.box[3] <= 64
            for b in objs[j + 1 :]:
                assert a.box[2] < b.box[0] or b.box[2] < a.box[0] or a.box[3] < b.box[1] or b.box[3] < a.box[1]
        if meta["tag"] == "position":
            rel, target = includes[1]["position"]
            assert rel in relative_position(objs[1].box, objs[target].box)
        # the caption says what the metadata says
        words = meta["prompt"]
        assert words.startswith("a photo of ") and all(r["class"] in words for r in includes)
        pairs = {(o.colour, o.shape) for o in objs}
        if split == "novel":
            assert pairs & set(NOVEL_PAIRS) and meta["tag"] in ("colors", "color_attr")
        else:
            assert not pairs & set(NOVEL_PAIRS)


def test_task_mix_of_the_splits():
    train = [split_prompt("train", 0, i)["tag"] for i in range(1200)]
    assert set(train) == set(TASKS) and min(train.count(t) for t in TASKS) > 150
    held = [split_prompt("heldout", 0, i)["tag"] for i in range(1106)]
    for tag, n in GENEVAL_TASK_PROMPTS.items():  # GenEval's proportions, within sampling noise
        assert abs(held.count(tag) - 2 * n) < 60, tag
    # the novel pairs appear in training only when asked for
    drawn = {(o.colour, o.shape) for i in range(400) for o in split_scene("train", 0, i, include_novel=True).objects}
    assert set(NOVEL_PAIRS) <= drawn


def test_captions_use_genevals_templates():
    seen = {}
    for i in range(300):
        meta = split_prompt("train", 0, i)
        seen.setdefault(meta["tag"], meta)
    assert seen["single_object"]["prompt"] == f"a photo of a {seen['single_object']['include'][0]['class']}"
    counting = seen["counting"]
    n = counting["include"][0]["count"]
    assert counting["prompt"] == f"a photo of {('two', 'three', 'four')[n - 2]} {counting['include'][0]['class']}s"
    b, a = seen["position"]["include"]
    assert seen["position"]["prompt"] == f"a photo of a {a['class']} {a['position'][0]} a {b['class']}"
    assert {o["class"] for o in seen["two_object"]["include"]} <= set(SHAPES)
    (c,) = seen["colors"]["include"]
    article = "an" if c["color"][0] in "aeiou" else "a"
    assert seen["colors"]["prompt"] == f"a photo of {article} {c['color']} {c['class']}"


def test_compose_folder_is_read_by_convert(tmp_path, capsys):
    from data_prep import convert



    out = tmp_path / "scenes"
    assert main(["data", "compose", "--out", str(out), "--count", "12", "--seed", "5", "--size", "32"]) == 0
    pngs = sorted(out.glob("*.png"))
    records = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert len(pngs) == len(records) == 12 and Image.open(pngs[0]).size == (32, 32)
    for png, rec in zip(pngs, records, strict=True):
        assert rec["file"] == png.name and png.with_suffix(".txt").read_text().strip() == rec["metadata"]["prompt"]
        assert np.array_equal(np.asarray(Image.open(png)), render_scene(split_scene("train", 5, int(png.stem[-6:]),
                                                                                      32)))
    mds = tmp_path / "mds"
    assert convert.main([str(out), "--format", "folder", "--out", str(mds), "--min-size", "32", "--workers", "0",
                         "--no-progress"]) == 0
    samples = read_mds(mds)
    assert len(samples) == 12 and {s["caption"] for s in samples.values()} == {r["metadata"]["prompt"] for r in records}
    with pytest.raises(UsageError, match="already exists"):  # nothing written before is overwritten
        compose(out, 2, 5)
    with pytest.raises(ValueError, match="--images-per-prompt only applies"):
        compose(tmp_path / "x", 2, 5, images_per_prompt=2)
    # the command reports both as usage errors (exit 2, one line); the old layout name fails naming the new one
    assert main(["data", "compose", "--out", str(out), "--count", "2", "--seed", "5"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "compose", "--out", str(tmp_path / "x"), "--count", "2", "--seed", "5",
                 "--images-per-prompt", "2"]) == 2
    assert "--images-per-prompt only applies" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["data", "compose", "--out", str(tmp_path / "y"), "--count", "2", "--seed", "5", "--layout", "folder"])
    assert stop.value.code == 2 and "use --layout flat" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["data", "compose", "--help"])
    assert stop.value.code == 0 and "default: flat" in capsys.readouterr().out


def test_geneval_layout_round_trips(tmp_path):
    out = tmp_path / "gt"
    assert main(["data", "compose", "--out", str(out), "--count", "5", "--seed", "0", "--split", "heldout",
                 "--layout", "geneval", "--images-per-prompt", "3"]) == 0
    lines = read_prompts_file(out / "evaluation_metadata.jsonl")
    layout = read_layout(out)
    assert [p.index for p in layout] == list(range(5)) and [p.metadata for p in layout] == lines
    assert lines == [split_prompt("heldout", 0, i) for i in range(5)]
    for p in layout:  # GenEval's names: <00000>/metadata.jsonl (one object), <00000>/samples/<0000>.png
        assert [im.relative_to(out).as_posix() for im in p.images] == [f"{p.index:05d}/samples/{k:04d}.png"
                                                                       for k in range(3)]
        assert json.loads((out / f"{p.index:05d}" / "metadata.jsonl").read_text()) == p.metadata
        expected = render_scene(split_scene("heldout", 0, p.index, image=1))
        assert np.array_equal(np.asarray(Image.open(p.images[1])), expected)
    # writing the layout by hand reads back the same; a folder of another prompt is refused
    pixels = np.zeros((8, 8, 3), np.uint8)
    write_prompt(tmp_path / "own", 7, lines[0])
    write_sample(tmp_path / "own", 7, 0, pixels)
    (back,) = read_layout(tmp_path / "own")
    assert back.index == 7 and back.metadata == lines[0] and np.array_equal(np.asarray(Image.open(back.images[0])),
                                                                            pixels)
    with pytest.raises(ValueError, match="holds another prompt"):
        write_prompt(tmp_path / "own", 7, lines[1])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 1: key 'include'"):
        read_prompts_file(tmp_path / "bad.jsonl")


def test_relative_position_is_genevals_margin_rule():
    box = (10, 10, 20, 20)  # 10 px wide
    assert relative_position((30, 10, 40, 20), box) == {"right of"}
    assert relative_position((0, 10, 10, 20), (10, 10, 20, 20)) == {"left of"}  # touching, 10 px apart: 10 - 2 > 0
    # 4 px right: the margin (0.1 * 20 px) leaves 2 px, half the offset, not more; 5 px leaves 3 of 5
    assert relative_position((14, 10, 24, 20), box) == set()
    assert relative_position((15, 10, 25, 20), box) == {"right of"}
    assert relative_position((15, 10, 25, 20), box, threshold=0.2) == set()  # a wider margin: 1 of 5
    assert relative_position((11, 10, 21, 20), box) == set()  # inside the margin altogether
    assert relative_position((15, 15, 25, 25), box) == set()  # diagonal: each share 3/7.07 < 0.5...
    assert relative_position((30, 30, 40, 40), box) == {"right of", "below"}  # ...far diagonal: both 18/28.3
    assert relative_position((10, 0, 20, 6), box) == {"above"}
