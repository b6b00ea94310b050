"""Test set-up: private temp dirs for Streaming's lock files, quiet matplotlib cache, no hub access."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "md-mplconfig"))

import atexit  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import weakref  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_runs import make  # noqa: E402


@pytest.fixture(autouse=True)
def private_tmp(tmp_path_factory, monkeypatch):
    """Streaming leaves lock files in TMPDIR: each test gets its own, for itself and the processes it starts."""
    tmp = tmp_path_factory.mktemp("tmpdir")  # beside tmp_path, not in it: tests check what they write there
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield
    if _MEMORIES:  # only a test that opened Streaming datasets pays for a collection (about 0.3 s)
        gc.collect()  # drop finished datasets before their shared memory is closed
        release_streaming_memory()


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo pipeline at QUICK size (`make demo QUICK=1`), run once for the demo and serve tests."""
    from micro_diffusion.demo.pipeline import DemoConfig

    root = tmp_path_factory.mktemp("demo")
    make("demo", "QUICK=1", f"DEMO_ROOT={root}")
    return DemoConfig.quick(root), json.loads((root / "summary.json").read_text())


_MEMORIES: weakref.WeakSet = weakref.WeakSet()  # every Streaming SharedMemory this process opened and has not closed


def _track_streaming_memory() -> None:
    """Record each SharedMemory Streaming opens in this process, so a test's teardown finds them without a heap scan."""
    try:
        from streaming.base.shared.memory import SharedMemory
    except ImportError:
        return
    opened = SharedMemory.__init__

    def init(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        _MEMORIES.add(self)

    SharedMemory.__init__ = init


_track_streaming_memory()


def release_streaming_memory() -> None:
    """Close the shared memory of this test's Streaming datasets now, not at exit.

    Streaming registers every SharedMemory it creates or opens with atexit, so each dataset built in this process keeps
    its files open until the process ends: over the whole suite that ran out of file descriptors (20,000 here).
    """
    for obj in list(_MEMORIES):
        atexit.unregister(obj.cleanup)
        obj.cleanup()
        _MEMORIES.discard(obj)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked gpu where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
