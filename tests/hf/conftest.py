"""Fixtures shared by the fusedecode.hf tests (nothing here needs transformers)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is faster than two, and much faster on a loaded machine,
    where two OpenMP threads wait for each other inside every small matmul."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
