"""Test setup: CPU by default (interpreters); `-m gpu` selects the GPU tests.

Without a GPU the `gpu` tests are skipped; with `-m gpu` only they run.
"""

import os
import zlib

import numpy as np
import pytest

# JAX must not grab the whole GPU when torch shares it in one process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# triton_gg switches the Triton interpreter on (where there is no GPU) only if it is imported
# before triton itself; some tests import triton directly, so import it first, whatever runs.
try:
    import triton_gg  # noqa: F401
except ImportError:  # torch/triton not installed: those tests skip themselves
    pass


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _session_tuning_cache(tmp_path_factory):
    """The whole session writes and reads tuned configs in a directory of its own, never the
    user's ~/.cache (tests that need an empty one point GG_CACHE_DIR elsewhere themselves)."""
    saved = os.environ.get("GG_CACHE_DIR")
    os.environ["GG_CACHE_DIR"] = str(tmp_path_factory.mktemp("gg_cache"))
    yield
    if saved is None:
        os.environ.pop("GG_CACHE_DIR", None)
    else:
        os.environ["GG_CACHE_DIR"] = saved


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name (reproducible, not shared)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
