"""The GenEval-style scorer: GenEval's rules on hand-made cases, the reader on ground truth, scores.json, and
`micro-diffusion sample --layout geneval` writing the layout the scorer reads."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from micro_diffusion.cli import main
from micro_diffusion.data.drawing import render_scene
from micro_diffusion.data.geneval import read_layout, write_prompts_file
from micro_diffusion.data.scenes import TASKS, Scene, SceneObject, split_prompt, split_scene
from micro_diffusion.eval.compose import score_folder, summarise
from micro_diffusion.eval.geneval_rules import evaluate
from micro_diffusion.eval.reader import by_class, read_objects


@dataclass
class Obj:
    colour: str
    box: tuple[float, float, float, float]


def objs(**groups: list[tuple[str, tuple]]) -> dict[str, list[Obj]]:
    return {name: [Obj(c, b) for c, b in found] for name, found in groups.items()}


B1, B2, B3, B4 = (0, 0, 10, 10), (30, 0, 40, 10), (0, 30, 10, 40), (30, 30, 40, 40)


def test_counts_and_excludes_with_counts():
    three = {"tag": "counting", "include": [{"class": "circle", "count": 3}],
             "exclude": [{"class": "circle", "count": 4}], "prompt": "a photo of three circles"}
    assert evaluate(objs(circle=[("red", B1), ("red", B2), ("blue", B3)]), three)[0]
    ok, why = evaluate(objs(circle=[("red", B1), ("red", B2)]), three)
    assert not ok and why == ["expected circle>=3, found 2"]
    ok, why = evaluate(objs(circle=[("red", b) for b in (B1, B2, B3, B4)]), three)  # N+1 found: the exclude fails
    assert not ok and why == ["expected circle<4, found 4"]
    assert evaluate(objs(circle=[("red", B1), ("red", B2), ("red", B3)], square=[("red", B4)]), three)[0]
    two = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
           "prompt": "a photo of a circle and a square"}
    assert evaluate(objs(circle=[("red", B1)], square=[("red", B2)], rectangle=[("red", B3)]), two)[0]
    assert not evaluate(objs(circle=[("red", B1), ("red", B2)]), two)[0]


def test_colours_judge_only_the_most_confident_objects():
    red = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
           "prompt": "a photo of a red circle"}
    assert evaluate(objs(circle=[("red", B1)]), red)[0]
    ok, why = evaluate(objs(circle=[("blue", B1), ("red", B2)]), red)  # GenEval looks at the first `count` only
    assert not ok and why == ["expected red circle>=1, found 0 red"]
    attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                             {"class": "square", "count": 1, "color": "blue"}],
            "prompt": "a photo of a red circle and a blue square"}
    assert evaluate(objs(circle=[("red", B1)], square=[("blue", B2)]), attr)[0]
    assert not evaluate(objs(circle=[("blue", B1)], square=[("red", B2)]), attr)[0]  # colours swapped


def test_position_with_the_margin_rule():
    left = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a circle left of a square"}
    assert evaluate(objs(square=[("red", B2)], circle=[("red", B1)]), left)[0]
    assert not evaluate(objs(square=[("red", B1)], circle=[("red", B2)]), left)[0]  # right of instead
    # 4 px apart with 10 px boxes: the margin (0.1 * 20 px) leaves half the offset, not more: no relation
    assert not evaluate(objs(square=[("red", (14, 0, 24, 10))], circle=[("red", (10, 0, 20, 10))]), left)[0]
    assert evaluate(objs(square=[("red", (15, 0, 25, 10))], circle=[("red", (10, 0, 20, 10))]), left)[0]
    ok, why = evaluate(objs(circle=[("red", B1)]), left)  # no target: the position cannot hold
    assert not ok and why == ["expected square>=1, found 0", "no target for circle to be left of"]
    below = dict(left, include=[left["include"][0], {"class": "circle", "count": 1, "position": ["below", 0]}])
    assert evaluate(objs(square=[("red", B1)], circle=[("red", B3)]), below)[0]


def test_reader_reads_hand_drawn_scenes():
    scene = Scene({"tag": "two_object", "include": [], "prompt": ""},
                  (SceneObject("triangle", "pink", (245, 135, 205), (6, 6, 24, 24)),
                   SceneObject("rectangle", "brown", (130, 75, 30), (40, 8, 58, 17)),
                   SceneObject("circle", "green", (40, 175, 65), (8, 40, 21, 53)),
                   SceneObject("square", "blue", (40, 85, 230), (40, 40, 53, 53))),
                  {"level": 120.0, "gradient": 12.0, "angle": 1.0, "noise": 3.0, "noise_seed": 0}, 64)
    found = {(d.shape, d.colour) for d in read_objects(render_scene(scene))}
    assert found == {("triangle", "pink"), ("rectangle", "brown"), ("circle", "green"), ("square", "blue")}
    (square,) = by_class(read_objects(render_scene(scene)))["square"]
    assert np.allclose(square.box, (40, 40, 53, 53), atol=1)
    grey = np.full((64, 64, 3), 128, np.uint8)
    grey[30:32, 30:32] = (200, 40, 40)  # a 2x2 speck is noise, not an object
    assert read_objects(grey) == []


@pytest.mark.parametrize("size", [64, 32])
def test_ground_truth_scores_one(size):
    scenes = [split_scene("heldout", 0, i, size) for i in range(90)]
    assert {s.metadata["tag"] for s in scenes} == set(TASKS)
    for s in scenes:
        ok, why = evaluate(by_class(read_objects(render_scene(s))), s.metadata)
        assert ok, (s.metadata["prompt"], why)


def test_eval_compose_writes_scores_json(tmp_path):
    gt = tmp_path / "gt"
    assert main(["data", "compose", "--out", str(gt), "--count", "24", "--seed", "3", "--split", "heldout",
                 "--layout", "geneval", "--images-per-prompt", "2"]) == 0
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    blank.save(gt / "00001" / "samples" / "0001.png")  # one wrong image
    assert main(["eval", "compose", str(gt)]) == 0
    scores = json.loads((gt / "scores.json").read_text())
    assert set(scores) == {"tasks", "overall", "images", "prompts", "reader"} and scores["images"] == 48
    tag = scores["prompts"][1]["tag"]
    assert scores["prompts"][1]["correct"] == [True, False] and scores["prompts"][1]["index"] == 1
    assert scores["tasks"][tag]["accuracy"] < 1.0
    assert all(v["accuracy"] == 1.0 for t, v in scores["tasks"].items() if t != tag)
    n = sum(1 for p in scores["prompts"] if p["tag"] == tag)
    assert scores["tasks"][tag]["images"] == 2 * n and scores["tasks"][tag]["accuracy"] == (2 * n - 1) / (2 * n)
    assert scores["overall"] == pytest.approx(np.mean([v["accuracy"] for v in scores["tasks"].values()]))
    reader = scores["reader"]
    assert {"ground_truth", "shuffled", "chance"} <= set(reader) and reader["size"] == 64
    assert all(v["accuracy"] == 1.0 for v in reader["ground_truth"]["tasks"].values())
    assert reader["shuffled"]["overall"] < 0.6 and reader["chance"]["overall"] < 0.6
    (tmp_path / "o").mkdir()
    assert main(["eval", "compose", str(gt), "--out", str(tmp_path / "o" / "s.json")]) == 0
    assert json.loads((tmp_path / "o" / "s.json").read_text())["prompts"] == scores["prompts"]


def test_scorer_refuses_prompts_it_cannot_read(tmp_path):
    out = tmp_path / "coco"
    line = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
    from micro_diffusion.data.geneval import write_prompt, write_sample

    write_prompt(out, 0, line)
    write_sample(out, 0, 0, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="00000/metadata.jsonl: class 'bench' is not a scene shape"):
        score_folder(out)
    assert summarise(["colors", "counting"], [True, False])["overall"] == 0.5


def _tiny_export(tmp_path):
    """A tiny exported model with a random 2x VAE (16 px images) and the packaged MiniLM text encoder."""
    from diffusers import AutoencoderKL

    from micro_diffusion.exported import export_model
    from micro_diffusion.models import create_dit

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=384, width=64, depth=2, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=64)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    config = {"preset": "MicroDiT_Tiny_2", "network": net.cfg.to_dict(), "recipe": "test", "sigma_data": 0.9,
              "encoders": {"vae": str(tmp_path / "vae"), "scaling_factor": 1.0, "latent_channels": 4, "downsample": 2,
                           "text_encoder": "minilm", "caption_len": 8, "caption_dim": 384, "resolutions": [16]}}
    state = dict(net.state_dict())
    null = np.random.default_rng(0).standard_normal((8, 384)).astype(np.float16)
    return export_model(state, None, config, null, tmp_path / "export")


def test_sample_writes_genevals_layout_one_seed_an_image(tmp_path, capsys):
    model = _tiny_export(tmp_path)
    prompts = write_prompts_file(tmp_path / "evaluation_metadata.jsonl", [split_prompt("heldout", 0, i)
                                                                          for i in range(3)])
    base = ["sample", str(model), "--prompts", str(prompts), "--layout", "geneval", "--steps", "2",
            "--seed", "4"]
    assert main([*base, "--images-per-prompt", "2", "--out", str(tmp_path / "a"), "--batch-size", "4"]) == 0
    layout = read_layout(tmp_path / "a")
    assert [p.metadata for p in layout] == [split_prompt("heldout", 0, i) for i in range(3)]
    assert [len(p.images) for p in layout] == [2, 2, 2] and Image.open(layout[0].images[0]).size == (16, 16)
    info = json.loads((tmp_path / "a" / "sampling.json").read_text())
    assert info["seed"] == 4 and info["images_per_prompt"] == 2 and info["vae"] == str(tmp_path / "vae")
    # image k of prompt p is image p*K+k of the run: the flat layout with the same seed gives the same pixels
    texts = [p.metadata["prompt"] for p in layout]
    assert main(["sample", str(model), "--prompt", texts[0], "--prompt", texts[0], "--prompt", texts[1],
                 "--steps", "2", "--seed", "4", "--out", str(tmp_path / "flat")]) == 0
    a = [np.asarray(Image.open(p.images[0]), np.int16) for p in layout]
    pixels = np.asarray(Image.open(tmp_path / "flat" / "00002.png"), np.int16)  # image 2: prompt 1's image 0
    assert np.abs(a[1] - pixels).max() <= 1 and np.abs(a[0] - a[1]).max() > 1
    # a different batch size, resumed over a partial folder, gives the same images
    (tmp_path / "a" / "00002" / "samples" / "0001.png").unlink()
    assert main([*base, "--images-per-prompt", "2", "--out", str(tmp_path / "a"), "--batch-size", "1"]) == 0
    assert len(read_layout(tmp_path / "a")[2].images) == 2
    capsys.readouterr()
    assert main([*base, "--prompt", "a photo of a circle", "--out", str(tmp_path / "b")]) == 2
    assert "--prompts evaluation_metadata.jsonl alone" in capsys.readouterr().err
    assert main(["sample", str(model), "--prompt", "x", "--images-per-prompt", "2", "--out",
                 str(tmp_path / "c")]) == 2
    assert "--images-per-prompt only applies" in capsys.readouterr().err


def test_sample_defaults_to_the_exports_recorded_settings(tmp_path):
    from micro_diffusion.diffusion.sampling import DEFAULTS

    model = _tiny_export(tmp_path)

    def sampled(name, *flags):
        out = tmp_path / name
        assert main(["sample", str(model), "--prompt", "a red circle", "--prompt", "a blue square", "--save-latents",
                     "--out", str(out), *flags]) == 0
        return json.loads((out / "prompts.json").read_text())["sampling"], np.load(out / "latents.npy")

    older, _ = sampled("older")  # an export that records no sampling settings: the package defaults
    assert older == {**DEFAULTS.to_dict(), "guidance_interval": None}
    recorded = {"steps": 2, "guidance": 2.5, "sampler": "euler", "guidance_interval": [0.1, 10.0]}
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "sampling": recorded}))
    settings, latents = sampled("recorded")
    assert settings == recorded
    _, explicit = sampled("explicit", "--steps", "2", "--guidance", "2.5", "--sampler", "euler",
                          "--guidance-interval", "0.1", "10")
    assert np.array_equal(latents, explicit)  # the recorded settings are the ones that ran
    assert sampled("steps", "--steps", "3")[0] == {**recorded, "steps": 3}  # a flag overrides only its setting


def test_committed_vae_carries_the_scenes():
    """Ground truth through the demo VAE (encode, decode) still reads right: the ceiling of a model trained on it."""
    from micro_diffusion.demo import demo_vae_path
    from micro_diffusion.encoders import load_vae
    from micro_diffusion.eval.compose import reader_trust

    lines = [split_prompt("heldout", 0, i) for i in range(60)]
    trust = reader_trust(lines, 64, load_vae(str(demo_vae_path())))
    assert trust["ground_truth"]["overall"] == 1.0 and trust["vae"]["overall"] >= 0.95
