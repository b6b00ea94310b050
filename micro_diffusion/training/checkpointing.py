"""Activation checkpointing without FSDP (DDP, one device, CPU): each transformer block recomputed in the backward.

Under FSDP, Composer wraps the blocks itself (its fsdp config's `activation_checkpointing`, asking the network's
`activation_checkpointing_fn`); builder.py picks one path or the other. Here the block's own forward is replaced on
the instance, not the module by a wrapper module, so parameter names, the state dict, checkpoints and EMA stay those
of an unwrapped network, and a stage trained with checkpointing loads into one without.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def recompute(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """forward(*args, **kwargs), keeping only its inputs for backward and running it again there (non-reentrant
    torch.utils.checkpoint); a plain call when no gradient is recorded (sampling, validation)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether checkpoint_blocks replaced this module's forward."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is recompute


def checkpoint_blocks(net: nn.Module, block_types: tuple[type, ...]) -> int:
    """Recompute every module of `block_types` inside `net` in the backward; returns how many (0 is an error: a
    setting that changes nothing). Applying it twice changes nothing more."""
    blocks = [m for m in net.modules() if isinstance(m, block_types)]
    if not blocks:
        raise ValueError(f"activation checkpointing: {type(net).__name__} has no "
                         f"{' or '.join(t.__name__ for t in block_types)} to recompute")
    for block in blocks:
        if not is_checkpointed(block):
            # a partial of the bound method (not a closure): deepcopy and pickle then follow the copied module
            block.forward = partial(recompute, block.forward)
    return len(blocks)
