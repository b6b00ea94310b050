"""Import the paper's released MicroDiT weights (SonyResearch/micro_diffusion's layout) into an exported-model folder.

The released files (Hugging Face VSehwag24/MicroDiT, `ckpts/*.pt`) are pickled state dicts of the reference DiT. Our
network computes what it computes (docs/released-models.md); only names and layouts differ:
SwiGLU's separate w1/w2 are our fused `w_in` ([gate; up]), `blocks.N.cross_attn.q_linear` is our `blocks.N.cross.q`,
and so on. The buffers `pos_embed` (1, T, D) and `mask_token` are checked against ours, not copied: positions are
computed (the file's interpolation is inferred from them) and dropped patches predict zeros.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .diffusion.edm import SIGMA_DATA
from .errors import UsageError
from .exported import check_target, export_model
from .models import MicroDiT, create_dit, list_presets, preset_config
from .version import __version__

HF_SCHEME = "hf://"
TEXT_ENCODER = "open_clip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378"  # the paper's text tower: 77 x 1024 tokens
VAES = {4: ("stabilityai/stable-diffusion-xl-base-1.0/vae", 0.13025), 16: ("ostris/vae-kl-f8-d16", None)}
CAPTION_LEN, DOWNSAMPLE, PREFIX = 77, 8, "dit."
OTHER_SUBTREES = ("vae.", "text_encoder.", "tokenizer.")  # parts of the reference's whole LatentDiffusion object
# Our name's start -> the reference's, then pieces inside a block (first match of each list wins).
_TOP = [("patch_embed.", "x_embedder."), ("noise_embed.", "t_embedder."),
        ("caption_embed.proj.0.", "y_embedder.y_proj.fc1."), ("caption_embed.proj.2.", "y_embedder.y_proj.norm."),
        ("caption_embed.proj.3.", "y_embedder.y_proj.fc2."), ("caption_embed.pool.0.", "pooled_y_emb_process.fc1."),
        ("caption_embed.pool.2.", "pooled_y_emb_process.norm."), ("caption_embed.pool.3.", "pooled_y_emb_process.fc2."),
        ("caption_embed.block.", "y_emb_preprocess."), ("mixer_in.", "patch_mixer_map_xin."),
        ("mixer_out.", "patch_mixer_map_xout."), ("mixer_caption.", "patch_mixer_map_y."), ("mixer.", "patch_mixer."),
        ("final.norm.", "final_layer.norm_final."), ("final.adaLN.", "final_layer.adaLN_modulation."),
        ("final.linear.", "final_layer.linear."), ("blocks.", "blocks.")]
_INNER = [(".cross.q.", ".cross_attn.q_linear."), (".cross.kv.", ".cross_attn.kv_linear."),
          (".cross.proj.", ".cross_attn.proj."), (".adaLN.", ".adaLN_modulation."),
          (".ffn.w_out.weight", ".mlp.w3.weight"), (".ffn.router.weight", ".mlp.gate.weight"),
          (".ffn.w_in", ".mlp.w1"), (".ffn.w_out", ".mlp.w2")]
CHECKED = ("pos_embed", "mask_token")  # reference buffers compared with ours, not copied


class ReferenceImportError(UsageError):
    """A released file that cannot become our network: the message names the file and the tensors at fault (exit 2)."""


def reference_names(our_name: str) -> list[str]:
    """The reference tensors that make up one of ours, in order (two for a fused SwiGLU input, else one)."""
    ref = next((r + our_name[len(o):] for o, r in _TOP if our_name.startswith(o)), None)
    if ref is None:
        raise KeyError(f"no reference name for our tensor {our_name!r}")
    if ref.endswith(".ffn.w_in.weight"):  # fused [gate; up] = the reference's separate w1 and w2
        base = ref[: -len(".ffn.w_in.weight")]
        return [f"{base}.mlp.w1.weight", f"{base}.mlp.w2.weight"]
    for o, r in _INNER:
        if o in ref:
            return [ref.replace(o, r, 1)]
    return [ref]


def layout_map(net: MicroDiT) -> dict[str, tuple[str, int]]:
    """Reference name -> (our name, its part) for every tensor of our network's state dict."""
    return {ref: (ours, i) for ours in net.state_dict() for i, ref in enumerate(reference_names(ours))}


def to_reference(state: dict[str, torch.Tensor], net: MicroDiT) -> dict[str, torch.Tensor]:
    """Our state dict in the reference's names and layout, with its zero mask token and the positions it stores."""
    out = {}
    for ours, tensor in state.items():
        refs = reference_names(ours)
        for ref, part in zip(refs, tensor.chunk(len(refs), dim=0), strict=True):
            out[ref] = part.clone()
    c = net.cfg
    gh, gw = c.grid
    out["pos_embed"] = net.pos_embed(gh, gw, torch.device("cpu"), torch.float32)[None].clone()  # (1, T, D)
    out["mask_token"] = torch.zeros(1, 1, c.patch_size ** 2 * c.in_channels)
    return out


def split_subtrees(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """(the DiT's tensors with any `dit.` prefix stripped, {other subtree: tensor count}) of a released file."""
    prefixed = any(k.startswith(PREFIX) for k in state)
    dit, others = {}, Counter()
    for key, value in state.items():
        if prefixed and not key.startswith(PREFIX) or not prefixed and key.startswith(OTHER_SUBTREES):
            others[key.split(".", 1)[0]] += 1
        else:
            dit[key[len(PREFIX):] if prefixed else key] = value
    return dit, dict(others)


def infer_config(dit: dict[str, torch.Tensor], where: str, preset: str | None = None, **overrides) -> tuple[str, dict]:
    """(preset, create_dit keywords) whose network has the file's widths, depths, channels and caption width."""
    need = ["x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "pos_embed"]
    missing = [k for k in need if k not in dit]
    if missing:
        raise ReferenceImportError(f"{where}: not a released MicroDiT state dict, it lacks {missing} "
                                   f"(keys start {sorted(dit)[:4]})")
    width, channels, p, _ = dit["x_embedder.proj.weight"].shape
    grid = math.isqrt(dit["pos_embed"].shape[1])
    if grid * grid != dit["pos_embed"].shape[1]:
        raise ReferenceImportError(f"{where}: pos_embed has {dit['pos_embed'].shape[1]} positions, not a square grid")
    depth = len({k.split(".")[1] for k in dit if k.startswith("blocks.")})
    mixer = len({k.split(".")[1] for k in dit if k.startswith("patch_mixer.")})
    mixer_width = dit["patch_mixer.0.norm1.weight"].shape[0] if mixer else width
    found = dict(width=width, depth=depth, patch_size=p, patch_mixer_depth=mixer, patch_mixer_width=mixer_width)
    kwargs = dict(latent_size=grid * p, in_channels=channels, caption_dim=dit["y_embedder.y_proj.fc1.weight"].shape[1])
    if preset is None:
        matches = [n for n in list_presets() if all(getattr(preset_config(n), k) == v for k, v in found.items())]
        if not matches:
            raise ReferenceImportError(f"{where}: no preset has the file's sizes {found} (presets: {list_presets()})")
        preset = matches[0]
    return preset, {**kwargs, **overrides}


def infer_pos_base_grid(pos_embed: torch.Tensor, grid: int, where: str) -> int:
    """The patch grid at which the file's positions are uninterpolated: grid x (column step of its table)."""
    dim = pos_embed.shape[-1]
    pe = pos_embed.reshape(-1, dim).double()  # (T, D); token 1 is row 0, column 1; feature 0 has frequency 1
    step = math.atan2(pe[1, 0].item(), pe[1, dim // 4].item()) if grid > 1 else 1.0  # sin, cos of the column step
    base = grid * step
    if step <= 0 or step > 1 + 1e-3 or abs(base - round(base)) > 1e-2:
        raise ReferenceImportError(f"{where}: pos_embed's column step {step:.5f} at a {grid}x{grid} grid is no "
                                   "interpolation our positions express (step 1/s, s >= 1, grid x step an integer)")
    return int(round(base))


def check_buffers(dit: dict[str, torch.Tensor], net: MicroDiT, where: str) -> None:
    """The file's pos_embed equals our computed positions and its mask token is zeros, or an error naming them."""
    gh, gw = net.cfg.grid
    ours = net.pos_embed(gh, gw, torch.device("cpu"), torch.float64)  # (T, D), computed (a meta net gives real ones)
    theirs = dit["pos_embed"].reshape(ours.shape).double()
    tol = 1e-5 if dit["pos_embed"].dtype == torch.float32 else 1e-2
    err = (ours - theirs).abs().max().item()
    if err > tol:
        raise ReferenceImportError(f"{where}: pos_embed differs from our positions by up to {err:.3g} (> {tol}); "
                                   "its layout or interpolation is not the released network's")
    mask = dit["mask_token"]
    if mask.abs().max().item() != 0:
        raise ReferenceImportError(f"{where}: mask_token is not zero (max |x| {mask.abs().max().item():.3g}); "
                                   "our network predicts zeros for dropped patches")


def convert_state(dit: dict[str, torch.Tensor], net: MicroDiT, where: str) -> dict[str, torch.Tensor]:
    """Our state dict from the reference tensors; every tensor placed and every one of ours filled, or an error."""
    mapping, want = layout_map(net), net.state_dict()
    extra = sorted(set(dit) - set(mapping) - set(CHECKED))
    missing = sorted((set(mapping) | set(CHECKED)) - set(dit))
    if extra or missing:
        raise ReferenceImportError(f"{where}: tensors that cannot be placed in our network: {extra or 'none'}; "
                                   f"tensors of ours left unfilled (reference names): {missing or 'none'}")
    parts: dict[str, list[torch.Tensor]] = {}
    for ref, (ours, _) in sorted(mapping.items(), key=lambda kv: kv[1]):
        parts.setdefault(ours, []).append(dit[ref])
    out = {}
    for ours, pieces in parts.items():
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        if tuple(tensor.shape) != tuple(want[ours].shape):
            names = [r for r, (o, _) in mapping.items() if o == ours]
            raise ReferenceImportError(f"{where}: {names} give shape {tuple(tensor.shape)}, our {ours} has "
                                       f"{tuple(want[ours].shape)}")
        out[ours] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def fetch(source: str) -> Path:
    """A local path as is; hf://OWNER/REPO/PATH downloaded once into the Hugging Face cache (needs the network)."""
    if not source.startswith(HF_SCHEME):
        return Path(source)
    parts = source[len(HF_SCHEME):].split("/", 2)
    if len(parts) < 3:
        raise ReferenceImportError(f"{source}: expected hf://OWNER/REPO/PATH/IN/REPO.pt")
    from huggingface_hub import hf_hub_download  # only for hub paths

    return Path(hf_hub_download(repo_id=f"{parts[0]}/{parts[1]}", filename=parts[2]))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_released(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a released file, unpickled with weights_only=True (tensors and plain containers only)."""
    if not path.is_file():
        raise ReferenceImportError(f"released checkpoint {path} does not exist: give a local .pt file or "
                                   "hf://VSehwag24/MicroDiT/ckpts/NAME.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = type(state).__name__ if not isinstance(state, dict) else f"dict with keys {sorted(state)[:4]}"
        raise ReferenceImportError(f"{path}: expected a state dict of tensors, got a {kind}")
    return state


def import_reference(source: str, out_dir: str | Path, in_channels: int | None = None, latent_size: int | None = None,
                     preset: str | None = None, **overrides) -> tuple[Path, dict]:
    """Convert a released file (local or hf://) into an exported-model folder; returns (folder, summary).

    in_channels: the VAE's channels (4: SDXL, 16: ostris/vae-kl-f8-d16); must agree with the file (default: the file's).
    latent_size: the latent side the export samples at (default: the file's, from its pos_embed).
    preset, overrides: the network the file holds (default: the preset with the file's sizes).
    """
    check_target(out_dir)  # before anything is fetched or read
    path = fetch(source)
    where = str(path)
    dit, others = split_subtrees(read_released(path))
    preset, kwargs = infer_config(dit, where, preset, **overrides)
    if in_channels is not None and in_channels != kwargs["in_channels"]:
        raise ReferenceImportError(f"{where}: --in-channels {in_channels}, but the file's patch embedding takes "
                                   f"{kwargs['in_channels']} channels")
    channels = kwargs["in_channels"]
    if channels not in VAES:
        raise ReferenceImportError(f"{where}: {channels} latent channels; the released VAEs have {sorted(VAES)}")
    grid = kwargs["latent_size"] // dit["x_embedder.proj.weight"].shape[-1]
    base = infer_pos_base_grid(dit["pos_embed"], grid, where)
    with torch.device("meta"):
        file_net = create_dit(preset, **{**kwargs, "pos_base_grid": base})  # names and shapes only
    state = convert_state(dit, file_net, where)
    check_buffers(dit, file_net, where)
    size = latent_size or kwargs["latent_size"]
    with torch.device("meta"):
        net = create_dit(preset, **{**kwargs, "latent_size": size, "pos_base_grid": base})
    vae, scaling = VAES[channels]
    encoders = {"vae": vae, "scaling_factor": scaling, "latent_channels": channels, "downsample": DOWNSAMPLE,
                "text_encoder": TEXT_ENCODER, "caption_len": CAPTION_LEN, "caption_dim": kwargs["caption_dim"],
                "resolutions": [size * DOWNSAMPLE]}
    config = {"preset": preset, "network": net.cfg.to_dict(), "sigma_data": SIGMA_DATA, "encoders": encoders,
              "recipe": None, "null_caption": "zeros", "micro_diffusion_version": __version__,
              "source": {"file": source, "sha256": sha256(path), "layout": "SonyResearch/micro_diffusion",
                         "pos_base_grid": base, "skipped_subtrees": others}}
    null = np.zeros((CAPTION_LEN, kwargs["caption_dim"]), dtype=np.float16)  # the released nets' unconditional input
    out = export_model(state, None, config, null, out_dir)
    return out, {"preset": preset, "tensors": len(dit), "skipped_subtrees": others, "pos_base_grid": base,
                 "latent_size": size, "in_channels": channels}
