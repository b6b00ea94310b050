"""The demo's single-shape scenes (data.shapes), the scene reader on their captions (eval.reader) and the committed
small VAE."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from micro_diffusion.data.shapes import (
    COLOURS,
    HELDOUT_SEED,
    IMAGE_SIZE,
    PALETTE,
    POSITIONS,
    SHAPES,
    TRAIN_SEED,
    SceneLabels,
    chance_level,
    draw_scene,
    generate,
    parse_caption,
    write_folder,
)
from micro_diffusion.demo import demo_vae_path
from micro_diffusion.eval.reader import attribute_accuracy, caption_match, read_image, shuffled_match


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, list[SceneLabels]]:
    """A few hundred held-out scenes."""
    return generate(160, HELDOUT_SEED)


def test_generator_is_deterministic_and_split_by_seed():
    images_a, labels_a = generate(16, TRAIN_SEED)
    images_b, labels_b = generate(16, TRAIN_SEED)
    images_c, _ = generate(16, HELDOUT_SEED)
    assert images_a.shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3) and images_a.dtype == np.uint8
    assert np.array_equal(images_a, images_b) and labels_a == labels_b
    assert not any(np.array_equal(a, c) for a, c in zip(images_a, images_c, strict=True))
    # A sample depends only on (seed, index): a longer split starts with the shorter one.
    assert np.array_equal(generate(20, TRAIN_SEED)[0][:16], images_a)


def test_generator_covers_the_attribute_sets_with_variation():
    scenes = [draw_scene(TRAIN_SEED, i) for i in range(400)]
    assert {s.labels.colour for s in scenes} == set(COLOURS)
    assert {s.labels.shape for s in scenes} == set(SHAPES)
    assert {s.labels.position for s in scenes} == set(POSITIONS)
    assert len({round(s.size, 3) for s in scenes}) > 100 and len({s.centre for s in scenes}) > 100


def test_caption_names_the_drawn_attributes():
    for i in range(50):
        scene = draw_scene(TRAIN_SEED, i)
        caption = scene.labels.caption()
        assert caption == f"a {scene.labels.colour} {scene.labels.shape} at the {scene.labels.position}"
        assert parse_caption(caption) == scene.labels
        # The drawn colour is the named palette colour (up to jitter), and the centre lies in the named cell.
        assert np.abs(np.subtract(scene.fill, PALETTE[scene.labels.colour])).max() <= 12
        row, column = POSITIONS[scene.labels.position]
        assert int(scene.centre[0] >= IMAGE_SIZE / 2) == column and int(scene.centre[1] >= IMAGE_SIZE / 2) == row


def test_parse_caption_errors_name_the_caption():
    assert parse_caption("A Blue Triangle at the bottom right.") == SceneLabels("blue", "triangle", "bottom right")
    with pytest.raises(ValueError, match="a pink circle at the top left"):
        parse_caption("a pink circle at the top left")
    with pytest.raises(ValueError, match="a red hexagon"):
        parse_caption("a red hexagon at the top left")
    with pytest.raises(ValueError, match="two dogs on a sofa"):
        parse_caption("two dogs on a sofa")


def test_write_folder_matches_the_convert_folder_layout(tmp_path: Path):
    labels = write_folder(tmp_path / "shapes", 12, seed=HELDOUT_SEED)
    pngs = sorted((tmp_path / "shapes").glob("*.png"))
    txts = sorted((tmp_path / "shapes").glob("*.txt"))
    assert len(pngs) == len(txts) == 12
    assert [p.stem for p in pngs] == [t.stem for t in txts]
    images, expected = generate(12, HELDOUT_SEED)
    assert labels == expected
    for i, (png, txt) in enumerate(zip(pngs, txts, strict=True)):
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), images[i])
        assert parse_caption(txt.read_text(encoding="utf-8")) == expected[i]


def test_reader_reads_real_heldout_images(heldout):
    images, labels = heldout
    accuracy = attribute_accuracy(images, labels)
    assert min(accuracy.values()) >= 0.95, accuracy
    assert caption_match(images, labels) >= 0.9


def test_reader_is_robust_to_blur_and_noise(heldout):
    images, labels = heldout
    rng = np.random.default_rng(0)
    blurred = np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.0))) for i in images])
    noisy = np.clip(blurred + rng.normal(0, 20, blurred.shape), 0, 255).astype(np.uint8)
    assert caption_match(noisy, labels) >= 0.9


def test_shuffled_pairs_score_near_chance(heldout):
    images, labels = heldout
    chance = chance_level()
    assert chance == pytest.approx((1 / len(COLOURS) + 1 / len(SHAPES) + 1 / len(POSITIONS)) / 3)
    shuffled = shuffled_match(images, labels, seed=3)
    assert abs(shuffled - chance) < 0.08
    assert caption_match(images, labels) > 3 * shuffled


def test_reader_finds_nothing_on_a_blank_image():
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 48, np.uint8)
    assert read_image(blank) == {"colour": None, "shape": None, "position": None}
    assert caption_match(blank[None], [SceneLabels("red", "circle", "top left")]) == 0.0


def test_reader_accepts_tensors_in_minus_one_one(heldout):
    images, labels = heldout
    tensor = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert caption_match(tensor, labels[:32]) == caption_match(images[:32], labels[:32])
    with pytest.raises(ValueError, match="as many labels"):
        caption_match(images[:4], labels[:3])


def test_committed_vae_loads_offline_and_reconstructions_read_back(heldout):
    from diffusers import AutoencoderKL

    path = demo_vae_path()
    assert (path / "config.json").is_file() and (path / "diffusion_pytorch_model.safetensors").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) < 5 * 2**20
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor != 0.18215
    images, labels = heldout[0][:48], heldout[1][:48]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        reconstruction = vae.decode(latents / vae.config.scaling_factor).sample
    assert latents.shape == (48, 4, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert 0.5 < float(latents.std()) < 2.0  # the scaling factor gives about unit std
    mse = float(((reconstruction.clamp(-1, 1) - x) / 2).pow(2).mean())
    assert -10 * np.log10(mse) > 22
    assert caption_match(reconstruction, labels) >= 0.9


def test_the_reader_finds_white_shapes_only_where_the_vocabulary_holds_white(heldout):
    from micro_diffusion.eval.reader import DEMO, GENEVAL, read_objects

    images, labels = heldout
    whites = [i for i, lab in enumerate(labels) if lab.colour == "white"]
    assert whites  # the demo draws white, which has no chroma: the reader finds it by lightness
    for i in whites[:10]:
        (found,) = read_objects(images[i], DEMO)
        assert (found.colour, found.shape) == (labels[i].colour, labels[i].shape)
        assert read_objects(images[i], GENEVAL) == []  # the compositional scenes have no white


def test_demo_captions_scored_genevals_way(heldout):
    from micro_diffusion.eval.compose import geneval_score

    images, labels = heldout
    white = sum(lab.colour == "white" for lab in labels)
    scores = geneval_score(images, labels)
    assert scores["overall"] == 1.0 and list(scores["tasks"]) == ["single_object", "colors"]
    assert scores["left_out"] == white and scores["images"] == len(labels) - white
    order = np.random.default_rng(0).permutation(len(labels))
    assert geneval_score(images, [labels[i] for i in order])["overall"] < 0.5
    with pytest.raises(ValueError, match="every shape is white"):
        geneval_score(images[:1], [SceneLabels("white", "circle", "top left")])
