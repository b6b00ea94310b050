"""FID and KID between two image folders through torch-fidelity, with the offline Inception of eval.inception."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import UsageError, check_counts
from ..utils.atomic import write_text_atomic
from ..utils.devices import usable_cpus
from .inception import default_cache_dir, local_inception_weights, torch_fidelity_inception

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def list_images(folder: str | Path) -> list[Path]:
    """Image files (png/jpg) directly inside a folder, sorted; an error when there are fewer than two."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if len(files) < 2:
        raise UsageError(f"{folder} holds {len(files)} png/jpg images; FID and KID need at least 2")
    return files


def reference_key(folder: str | Path, weights: Path) -> str:
    """A cache name for a reference folder's features: its files' names, sizes and times, and the weights file."""
    h = hashlib.sha1(str(weights.resolve()).encode())
    for f in list_images(folder):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"ref-{h.hexdigest()[:16]}"


def fid_kid(gen_dir: str | Path, ref_dir: str | Path, weights: str | Path | None = None, batch_size: int = 64,
            device: str | None = None, kid_subset_size: int = 1000, kid_subsets: int = 100,
            workers: bool | None = None, seed: int = 2020, cache_reference: bool = True) -> dict:
    """FID and KID (mean, std) of gen_dir against ref_dir, with the settings used, as a JSON-ready dict.

    workers: decode images in torch-fidelity's loader workers (it starts min(4, 2 x cores) of them); None: only
    where the machine has that many usable CPUs, else in this process. cache_reference: keep ref_dir's Inception
    features in torch-fidelity's cache under $MICRO_DIFFUSION_CACHE/fidelity, named by reference_key (a changed,
    added or removed file names another entry), so scoring several models against one reference encodes it once.
    """
    import torch_fidelity

    if workers is None:
        workers = min(4, 2 * (os.cpu_count() or 1)) <= usable_cpus()
    n_gen, n_ref = len(list_images(gen_dir)), len(list_images(ref_dir))
    weights = Path(weights) if weights is not None else local_inception_weights()
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    subset = min(kid_subset_size, n_gen, n_ref)  # KID draws subsets without replacement from each set
    metrics = torch_fidelity.calculate_metrics(
        input1=str(gen_dir), input2=str(ref_dir), fid=True, kid=True, cuda=cuda, batch_size=batch_size,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        kid_subset_size=subset, kid_subsets=kid_subsets, cache=cache_reference, save_cpu_ram=not workers,
        input2_cache_name=reference_key(ref_dir, weights) if cache_reference else None,
        cache_root=str(default_cache_dir() / "fidelity"), rng_seed=seed, verbose=False, samples_find_deep=False)
    return {
        "fid": float(metrics["frechet_inception_distance"]),
        "kid_mean": float(metrics["kernel_inception_distance_mean"]),
        "kid_std": float(metrics["kernel_inception_distance_std"]),
        "settings": {"gen_dir": str(gen_dir), "ref_dir": str(ref_dir), "num_gen": n_gen, "num_ref": n_ref,
                     "feature_extractor": "inception-v3-compat (TF inception-2015-12-05), 2048-d pool features",
                     "weights": str(weights), "kid_subset_size": subset, "kid_subsets": kid_subsets,
                     "kid_seed": seed, "library": f"torch-fidelity {torch_fidelity.__version__}"},
    }


def fid(gen: str | Path, ref: str | Path, out: str | Path | None = None, batch_size: int = 64,
        device: str | None = None) -> dict:
    """FID and KID of the images of `gen` against those of `ref` (see fid_kid), also written as JSON to `out`."""
    check_counts(batch_size=batch_size)
    if out is not None and Path(out).is_dir():
        raise UsageError(f"--out {out} is a folder: give the JSON file to write")
    result = fid_kid(gen, ref, batch_size=batch_size, device=device)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(out), json.dumps(result, indent=2) + "\n")
    return result


@torch.no_grad()
def inception_features(folder: str | Path, weights: str | Path | None = None, batch_size: int = 32,
                       device: str = "cpu", net: torch.nn.Module | None = None) -> np.ndarray:
    """2048-d Inception pool features of every image of a folder, in sorted file order: (N, 2048) float64."""
    net = net or torch_fidelity_inception(weights or local_inception_weights(), device)
    files, feats = list_images(folder), []
    for i in tqdm(range(0, len(files), batch_size), desc=f"inception {Path(folder).name}", leave=False):
        batch = [np.asarray(Image.open(f).convert("RGB")) for f in files[i:i + batch_size]]  # (H, W, 3) uint8 each
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
        feats.append(net(x)[0].double().cpu().numpy())
    return np.concatenate(feats)


def frechet_distance(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """FID of generated features (n, d) against a reference's mean (d,) and covariance (d, d), as torch-fidelity
    defines it: |mu_g - mu|^2 + tr(S_g) + tr(S) - 2 tr sqrt(S_g S).

    Written here because torch-fidelity takes the eigenvalues of the d x d product (d = 2048; seconds on a CPU), and
    a sampling sweep scores hundreds of small sets: with n <= d images, S_g = A^T A for the centred features A / sqrt(n
    - 1), and the nonzero eigenvalues of S_g S are those of the n x n symmetric A S A^T. The value is the same.
    """
    n = len(features)
    if n < 2:
        raise ValueError(f"FID needs at least 2 generated images, got {n}")
    mu_g = features.mean(0)
    a = (features - mu_g) / np.sqrt(n - 1)  # (n, d)
    if n <= features.shape[1]:
        eig = np.linalg.eigvalsh(a @ sigma @ a.T)
    else:
        eig = np.linalg.eigvals((a.T @ a) @ sigma).real
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu_g - mu) ** 2).sum() + (a * a).sum() + np.trace(sigma) - 2 * tr_covmean)


class FidScorer:
    """FID of many generated folders against one reference folder: the Inception network is loaded once and the
    reference's features are computed once (cached under $MICRO_DIFFUSION_CACHE/fidelity, named by reference_key)."""

    def __init__(self, ref_dir: str | Path, weights: str | Path | None = None, device: str = "cpu"):
        self.weights = Path(weights) if weights is not None else local_inception_weights()
        self.device = device
        self.net = torch_fidelity_inception(self.weights, device)
        cache = default_cache_dir() / "fidelity" / f"{reference_key(ref_dir, self.weights)}-pool2048.npy"
        if cache.is_file():
            ref = np.load(cache)
        else:
            ref = inception_features(ref_dir, device=device, net=self.net)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, ref)
            os.replace(tmp, cache)
        self.mu, self.sigma = ref.mean(0), np.cov(ref, rowvar=False)

    def __call__(self, gen_dir: str | Path) -> float:
        """FID of the folder's images against the reference."""
        return frechet_distance(inception_features(gen_dir, device=self.device, net=self.net), self.mu, self.sigma)
