"""A module's train/eval mode for the length of a block, then restored."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Run the body with `module` in training (True) or eval (False) mode, then restore the mode it had."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)
