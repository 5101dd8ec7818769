"""Shared fixtures. Nothing here touches CUDA at import time.

Random inputs are fresh on every run; the seed is printed in the header and can be replayed with
FUSEDECODE_TEST_SEED=<seed>. Each test derives its own generator from the seed and its node id, so
results do not depend on test order.
"""

import os
import random
import sys
import zlib

import pytest
import torch

# Test files live in per-op folders (tests/ops/<op>/); they share tests/helpers.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import BACKEND_CASES, require_backend  # noqa: E402  (needs the path above)

# Scripts and shared modules the tests run or import, never test modules themselves.
collect_ignore = ["support"]

_SEED = int(os.environ.get("FUSEDECODE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return (f"fusedecode test seed: {_SEED} (replay with FUSEDECODE_TEST_SEED={_SEED}); "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")


@pytest.fixture
def generator(request):
    """A CPU torch.Generator seeded from the run seed and this test's id."""
    g = torch.Generator()
    g.manual_seed(_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture(params=BACKEND_CASES)
def target(request):
    """The (device, backend) pair a backend-parametrised test runs on; skipped where unavailable."""
    device, backend = request.param
    require_backend(device, backend)
    return device, backend


def cuda_available():
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not cuda_available():
            item.add_marker(skip_cuda)
