"""Sizes given as one side or as (height, width)."""
from __future__ import annotations

from collections.abc import Sequence


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of a square side or an (H, W) pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)
