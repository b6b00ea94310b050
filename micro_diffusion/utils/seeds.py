"""Seeds and seeded draws: one function derives independent seeds, one makes a seeded generator, one draws from it."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A seed fixed by `keys` (e.g. (run seed, image index)) and statistically independent across different keys.

    numpy's SeedSequence hashes the whole tuple, so (1, 23) and (12, 3) give unrelated seeds, unlike arithmetic mixing.
    The key count goes in first: SeedSequence alone treats trailing zeros as absent, (5,) and (5, 0) alike.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key")
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([len(keys), *(int(k) for k in keys)]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> 1)  # 63 bits: fits torch.Generator.manual_seed and a signed int64


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`: the one way the project makes one."""
    return torch.Generator(device=device).manual_seed(int(seed))


def draw(kind: str, shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """A "randn" or "rand" tensor drawn on the generator's device (the global RNG of `device` when None), moved to
    `device` and `dtype`: the same numbers for a CPU generator whatever device the tensor ends on."""
    fn = {"randn": torch.randn, "rand": torch.rand}[kind]
    source = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, device=source).to(device, dtype)
