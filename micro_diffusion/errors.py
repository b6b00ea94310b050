"""The project's errors: each kind carries the exit code the command line reports it with (docs/exit-codes.md).

Step functions raise these; only `cli.py` files (and the `python -m` entry points) turn them into one line on stderr
and an exit code, through `exit_with`. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class MicroDiffusionError(Exception):
    """A problem the user can fix: the message names the file, key or value and what to do."""

    exit_code = 1  # a step that could not finish (convert with rejected sources, a failed verification)


class UsageError(MicroDiffusionError, ValueError):
    """A bad argument, recipe key or value, or a missing input file."""

    exit_code = 2


class Busy(UsageError):
    """Another job holds the folder's lock (a run, export or data folder has one writer); the message names it."""


class NonFiniteLoss(MicroDiffusionError, RuntimeError):
    """The training loss went NaN or infinite: the last checkpoint is the last good one."""

    exit_code = 3


class DataError(MicroDiffusionError):
    """Damaged data: a shard that fails its size or hash check, or a sample that does not decode."""

    exit_code = 4


class Preempted(MicroDiffusionError):
    """The job was stopped (SIGTERM) after saving a checkpoint; rerun the same command to resume."""

    exit_code = 143  # 128 + SIGTERM


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none), for a one-line error."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_counts(**counts: int | None) -> None:
    """Each given count (option name: value; None skips it) is at least 1, else a usage error naming the flag."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def exit_with(prog: str, fn: Callable[[], int | None]) -> int:
    """Run a command's body; a project error becomes one line `prog: message` on stderr and its exit code."""
    try:
        return int(fn() or 0)
    except MicroDiffusionError as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
        return err.exit_code
