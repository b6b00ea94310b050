"""Seed derivation: one function turns a tuple of integers into an independent 63-bit seed."""
from __future__ import annotations

import numpy as np


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
