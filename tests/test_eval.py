"""Evaluation: offline Inception conversion, FID/KID against an independent computation, COCO protocol, CLI sampling."""
import json

import numpy as np
import pytest
import scipy.linalg
import skimage.data
import torch
from PIL import Image

from micro_diffusion.eval.coco import draw_captions, generate_missing, missing_images, prepare_reference
from micro_diffusion.eval.fid import FidScorer, fid_kid, frechet_distance, inception_features, reference_key
from micro_diffusion.eval.inception import (
    default_cache_dir,
    fid_helper_weights_path,
    local_inception_weights,
    torch_fidelity_inception,
)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return local_inception_weights(tmp_path_factory.mktemp("cache"))


def write_images(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:06d}.png")
    return folder


def natural_crops(n, size=64, seed=0):
    """Random crops of scikit-image's bundled photos."""
    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        out.append(np.ascontiguousarray(p[y:y + size, x:x + size]))
    return out


def noise_images(n, size=64, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_converted_inception_matches_torchscript(inception_weights):
    net = torch_fidelity_inception(inception_weights)
    script = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").eval()
    imgs = torch.from_numpy(np.stack(natural_crops(1, size=299))).permute(0, 3, 1, 2)  # (1, 3, 299, 299) uint8
    with torch.no_grad():
        ours = net(imgs)[0]
        ref = script((imgs.float() - 128) / 128)  # the TF graph's input scaling
    assert ours.shape == (1, 2048)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    assert ours.abs().mean() > 0.05  # real features, not zeros


def frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to two feature sets, with scipy's matrix square root.

    With n samples, cov = A A^T for A = centred features / sqrt(n-1) (2048 x n); the nonzero eigenvalues of
    s1 s2 = A A^T B B^T are those of the n x n PSD matrix A^T B B^T A, so tr sqrt(s1 s2) = tr sqrtm(A^T B B^T A).
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    A, B = (a - mu1).T / np.sqrt(len(a) - 1), (b - mu2).T / np.sqrt(len(b) - 1)  # (2048, n)
    tr_covmean = np.trace(scipy.linalg.sqrtm(A.T @ B @ B.T @ A)).real
    return float(((mu1 - mu2) ** 2).sum() + (A * A).sum() + (B * B).sum() - 2 * tr_covmean)


@pytest.mark.slow
def test_fid_self_zero_different_positive_and_matches_scipy(tmp_path, inception_weights):
    # Inception at 299 px costs about a second per image on 2 CPU cores: four images per set keep this test short.
    real = write_images(tmp_path / "real", natural_crops(4))
    noise = write_images(tmp_path / "noise", noise_images(4))
    kw = dict(weights=inception_weights, workers=False, kid_subsets=10)
    same, far = fid_kid(real, real, **kw), fid_kid(real, noise, **kw)
    assert abs(same["fid"]) < 1e-2
    assert far["fid"] > 100 and far["kid_mean"] > 0.1 and far["kid_mean"] > same["kid_mean"]  # KID of 4 is noisy
    fa, fb = inception_features(real, inception_weights), inception_features(noise, inception_weights)
    assert np.isclose(far["fid"], frechet_scipy(fa, fb), rtol=1e-3), (far["fid"], frechet_scipy(fa, fb))
    assert far["settings"]["kid_subset_size"] == 4 and far["settings"]["num_gen"] == 4
    # the reference's features were cached on the first call: the cached call and an uncached one agree exactly
    key = reference_key(noise, inception_weights)
    assert any(p.name.startswith(key) for p in (default_cache_dir() / "fidelity").iterdir())
    assert fid_kid(real, noise, **kw)["fid"] == fid_kid(real, noise, cache_reference=False, **kw)["fid"] == far["fid"]
    # the sweep's scorer (reference features once, FID from the n x n form) gives torch-fidelity's number
    assert np.isclose(FidScorer(noise, inception_weights)(real), far["fid"], rtol=1e-4)
    Image.fromarray(noise_images(1)[0]).save(noise / "extra.png")  # a changed reference is another cache entry
    assert reference_key(noise, inception_weights) != key


@pytest.mark.parametrize("n_gen", [3, 12])  # fewer images than features (the n x n form) and more (the d x d one)
def test_frechet_distance_matches_the_definition(n_gen):
    rng = np.random.default_rng(n_gen)
    gen, ref = rng.normal(size=(n_gen, 6)), rng.normal(1.0, 2.0, size=(20, 6))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    root = scipy.linalg.sqrtm(np.cov(gen, rowvar=False) @ sigma).real
    want = ((gen.mean(0) - mu) ** 2).sum() + np.trace(np.cov(gen, rowvar=False) + sigma - 2 * root)
    assert np.isclose(frechet_distance(gen, mu, sigma), want, rtol=1e-6)


# ---------------------------------------------------------------- COCO protocol
def fake_annotations(path, n_images=40, caps_per_image=5, shuffle_seed=None):
    images = [{"id": 1000 + i, "file_name": f"COCO_val2014_{1000 + i:012d}.jpg"} for i in range(n_images)]
    anns = [{"id": 10 * i + j, "image_id": 1000 + i, "caption": f"image {i} caption {j}"}
            for i in range(n_images) for j in range(caps_per_image)]
    if shuffle_seed is not None:  # the same content in another order must give the same draw
        rng = np.random.default_rng(shuffle_seed)
        images = [images[k] for k in rng.permutation(len(images))]
        anns = [anns[k] for k in rng.permutation(len(anns))]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_caption_draw_is_fixed_across_runs_orders_and_ranks(tmp_path):
    a = draw_captions(fake_annotations(tmp_path / "a.json"), num=25)
    b = draw_captions(fake_annotations(tmp_path / "b.json", shuffle_seed=3), num=25)
    assert a == b and len(a) == 25
    assert len({d["image_id"] for d in a}) == 25  # one caption per image
    assert [d["index"] for d in a] == list(range(25))
    assert draw_captions(tmp_path / "a.json", num=25, seed=1) != a
    shards = [a[r::3] for r in range(3)]  # simulated ranks see disjoint shares covering the draw
    assert sorted(d["index"] for s in shards for d in s) == list(range(25))
    with pytest.raises(ValueError, match="fewer than"):
        draw_captions(tmp_path / "a.json", num=41)


def test_generation_resumes_without_regenerating(tmp_path):
    draw = draw_captions(fake_annotations(tmp_path / "ann.json"), num=20)
    rendered: list[int] = []

    def render(captions, indices, fail_after=None):
        if fail_after is not None and len(rendered) >= fail_after:
            raise KeyboardInterrupt  # a preempted job
        rendered.extend(indices)
        return [Image.new("RGB", (8, 8), (i % 256, 0, 0)) for i in indices]

    out = tmp_path / "gen"
    with pytest.raises(KeyboardInterrupt):  # rank 1 of 2 is interrupted after two batches
        generate_missing(draw, out, lambda c, i: render(c, i, fail_after=4), rank=1, world=2, batch_size=2)
    assert len(list(out.glob("*.png"))) == 4 and not list(out.glob(".*"))
    for rank in range(2):  # every rank (re)runs to the end
        generate_missing(draw, out, render, rank=rank, world=2, batch_size=3)
    assert sorted(rendered) == list(range(20))  # each image rendered exactly once
    assert missing_images(draw, out) == []
    assert generate_missing(draw, out, render, rank=0, world=2) == []


def test_reference_images_are_center_cropped(tmp_path):
    draw = draw_captions(fake_annotations(tmp_path / "ann.json", n_images=3), num=2)
    src = tmp_path / "val2014"
    src.mkdir()
    for d in draw:  # wide images: a red centre square between blue side bands
        a = np.zeros((20, 40, 3), np.uint8)
        a[:, :10, 2] = a[:, 30:, 2] = 255
        a[:, 10:30, 0] = 255
        Image.fromarray(a).save(src / d["file_name"])
    assert prepare_reference(draw, src, tmp_path / "ref", 16) == 2
    ref = np.asarray(Image.open(tmp_path / "ref" / "00000.png"))
    assert ref.shape == (16, 16, 3) and ref[..., 0].min() > 180 and ref[..., 2].max() < 100  # JPEG blurs edges a bit
    assert prepare_reference(draw, src, tmp_path / "ref", 16) == 0  # resumable


# ---------------------------------------------------------------- export and the sample CLI
def test_export_from_checkpoint_and_sample_cli(tmp_path):
    from diffusers import AutoencoderKL

    from micro_diffusion import load_exported
    from micro_diffusion.cli import main
    from micro_diffusion.exported import export_model
    from micro_diffusion.models import create_dit
    from micro_diffusion.training.export import load_composer_checkpoint

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(tmp_path / "vae")
    kw = dict(latent_size=8, caption_dim=384, width=64, depth=2, head_dim=16, patch_mixer_depth=1,
              patch_mixer_width=64)
    net = create_dit("MicroDiT_Tiny_2", **kw)
    for p in net.parameters():  # move off the zero-initialised output layer so the network does something
        p.data.add_(0.05 * torch.randn_like(p))
    raw = {f"net.{k}": v for k, v in net.state_dict().items()}
    ema = {f"net.{k}": v.detach() + 0.5 for k, v in net.named_parameters()}
    ckpt = tmp_path / "ep0-ba4-rank0.pt"  # the layout Composer writes: state.model and state.algorithms
    torch.save({"state": {"model": raw, "algorithms": [("EMA", {"ema_model": {"named_parameters_dict": ema,
                "named_buffers_dict": {}}, "ema_weights_active": False, "ema_started": True})]}}, ckpt)
    net_state, ema_state = load_composer_checkpoint(ckpt)
    assert set(net_state) == set(net.state_dict()) and torch.allclose(ema_state["final.linear.weight"] - 0.5,
                                                                       net_state["final.linear.weight"], atol=1e-6)
    config = {"preset": "MicroDiT_Tiny_2", "network": net.cfg.to_dict(), "recipe": "test", "sigma_data": 0.9,
              "encoders": {"vae": str(tmp_path / "vae"), "scaling_factor": 1.0, "latent_channels": 4, "downsample": 2,
                           "text_encoder": "minilm", "caption_len": 8, "caption_dim": 384, "resolutions": [16]}}
    null = np.random.default_rng(0).standard_normal((8, 384)).astype(np.float16)
    model_dir = export_model(net_state, ema_state, config, null, tmp_path / "export")
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors",
                                                          "null_caption.npy"]
    loaded, cfg, _ = load_exported(model_dir, use_ema=False)
    assert torch.equal(loaded.state_dict()["final.linear.weight"], net.state_dict()["final.linear.weight"])

    args = ["sample", str(model_dir), "--prompt", "a red square", "--prompt", "a blue circle",
            "--steps", "2", "--guidance", "3", "--seed", "0"]
    assert main(args + ["--out", str(tmp_path / "ema")]) == 0
    assert main(args + ["--raw", "--out", str(tmp_path / "raw")]) == 0
    pngs = sorted(p.name for p in (tmp_path / "ema").glob("*.png"))
    assert pngs == ["00000.png", "00001.png", "grid.png"]
    assert Image.open(tmp_path / "ema" / "00000.png").size == (16, 16)
    assert Image.open(tmp_path / "ema" / "grid.png").size == (32, 16)
    info = json.loads((tmp_path / "ema" / "prompts.json").read_text())
    assert info["weights"] == "ema.safetensors" and info["sampling"]["guidance"] == 3.0 and info["seed"] == 0
    a, b = (np.asarray(Image.open(tmp_path / d / "00000.png")) for d in ("ema", "raw"))
    assert not np.array_equal(a, b)  # EMA and raw weights really give different images


# ---------------------------------------------------------------- sweeps
def test_sweep_scores_each_point_once_with_relative_cost(tmp_path):
    from micro_diffusion.cost.flops import sample_flops_per_image
    from micro_diffusion.diffusion.sampling import SamplingSettings
    from micro_diffusion.eval.sweep import HeldOut, grid, point_name, sweep
    from micro_diffusion.eval.sweep_plots import plot_sweep
    from micro_diffusion.models import create_dit

    net = create_dit("MicroDiT_Tiny_2", latent_size=8, caption_dim=32, width=64, depth=2, head_dim=16,
                     patch_mixer_depth=1, patch_mixer_width=64)
    held = HeldOut(draw_captions(fake_annotations(tmp_path / "ann.json"), num=6), tmp_path / "ref")
    points = grid(SamplingSettings(), ["heun:30", "euler:30", "dpmpp_2m:10"], [1.0, 5.0])
    rendered, scored = [], []

    def make_render(s):
        def render(captions, indices):  # brightness encodes the settings so the score can tell points apart
            rendered.append((point_name(s), tuple(indices)))
            return [Image.new("RGB", (8, 8), (int(s.guidance * 10 + s.steps), 0, 0)) for _ in indices]
        return render

    def score(gen):
        scored.append(gen.parent.name)
        return float(np.mean([np.asarray(Image.open(p))[..., 0].mean() for p in gen.glob("*.png")]))

    def flops(s):
        return sample_flops_per_image(net, latent_size=8, caption_len=4, steps=s.steps, sampler=s.sampler,
                                      guidance=s.guidance != 1.0)

    result = sweep(points + points[:1], held, tmp_path / "sweep", make_render, score, flops, SamplingSettings(),
                   batch_size=4)
    assert len(scored) == len(set(scored)) == 6 and len(result) == 7  # a repeated point is scored once
    assert [(p["sampler"], p["guidance"]) for p in result[:2]] == [("heun", 1.0), ("heun", 5.0)]
    assert result[0]["fid"] != result[1]["fid"]
    cost = {(p["sampler"], p["guidance"]): p["relative_cost"] for p in result}
    assert cost["heun", 5.0] == 1.0 and np.isclose(cost["heun", 1.0], 0.5)  # guidance doubles the evaluations
    assert np.isclose(cost["euler", 5.0], 30 / 59) and np.isclose(cost["dpmpp_2m", 5.0], 10 / 59)
    assert all(p["images_per_s"] > 0 for p in result)
    plot_sweep({"tiny": [result]}, tmp_path / "sweep.png")
    assert Image.open(tmp_path / "sweep.png").size[0] > 100
    again = sweep(points, held, tmp_path / "sweep", make_render, score, flops, SamplingSettings())
    assert again == result[:6] and len(rendered) == 6 * 2  # resumed: nothing rendered or scored again
    assert len(scored) == 6


@pytest.mark.slow
def test_clip_score_with_random_open_clip(tmp_path):
    from micro_diffusion.eval.clip_score import clip_score

    files = sorted(write_images(tmp_path / "imgs", natural_crops(3)).glob("*.png"))
    torch.manual_seed(0)  # the same random weights for both calls: only the captions differ
    a = clip_score(files, ["a photo", "a cat", "coffee"], model_name="ViT-S-32", pretrained=None)
    torch.manual_seed(0)
    b = clip_score(files, ["text", "other text", "more"], model_name="ViT-S-32", pretrained=None)
    assert 0 <= a["clip_score"] <= 100 and a["clip_score"] != b["clip_score"]
    assert a["settings"]["clip_model"] == "ViT-S-32" and a["settings"]["num_images"] == 3
    with pytest.raises(ValueError, match="one caption per image"):
        clip_score(files, ["only one"], model_name="ViT-S-32", pretrained=None)


# ---------------------------------------------------------------- the command line's grammar and errors
@pytest.mark.parametrize("argv, new", [
    (["sample", "--model", "m", "--out", "o"], "positional MODEL"),
    (["sample", "m", "--out", "o", "--prompts-file", "p.jsonl"], "use --prompts"),
    (["eval", "fid", "--gen", "g", "--ref", "r"], "positional GEN"),
    (["eval", "coco", "--model", "m", "--out", "o"], "positional MODEL"),
    (["eval", "sweep", "--model", "m", "--out", "o"], "positional MODEL"),
    (["eval", "sweep", "m", "--out", "o", "--prompts", "p"], "use --geneval"),
    (["eval", "sweep", "m", "--out", "o", "--steps", "3"], "use --presets"),
    (["demo", "--root", "d"], "use --out"),
])
def test_old_flags_fail_naming_the_new_ones(argv, new, capsys):
    from micro_diffusion.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and new in capsys.readouterr().err


@pytest.mark.slow
def test_a_project_error_is_one_line_and_its_exit_code(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "micro_diffusion.cli", "eval", "fid", str(tmp_path / "nowhere"),
                           "--ref", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [f"micro-diffusion eval fid: image folder {tmp_path / 'nowhere'} "
                                               "does not exist"]


def test_sample_help_says_the_export_decides_its_settings(capsys):
    from micro_diffusion.cli import main

    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # steps, guidance, sampler, guidance mode, interval, and the fluid sampler's temperature and head steps
    assert text.count("(default: the export's") == 7 and "--prompts FILE" in text
