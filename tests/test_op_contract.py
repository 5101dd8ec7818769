"""Facts the C++ extension and the Python layer both state, checked equal across the two languages.

The schemas' return lists (built in csrc/ops.cpp from FUSEDECODE_LOGIT_STATS_OUTPUTS) are checked
against the Python op modules' OUTPUTS by tests/ops/test_registry.py; this file checks the top-k
limit (csrc/include/fusedecode/stats_outputs.h kMaxTopK, Python's MAX_TOPK), by value and by what the
native op accepts at both sides of it.
"""

import pytest
import torch

from fusedecode._native import native_build_info, native_unavailable_reason
from fusedecode.ops.logit_stats import MAX_TOPK

pytestmark = pytest.mark.skipif(native_unavailable_reason() is not None,
                                reason=f"native extension: {native_unavailable_reason()}")


def test_native_topk_limit_equals_pythons():
    assert native_build_info()["max_topk"] == MAX_TOPK


@pytest.mark.parametrize("topk", [0, MAX_TOPK])
def test_native_op_accepts_topk_up_to_the_limit(topk):
    logits = torch.randn(1, 3, MAX_TOPK + 8, generator=torch.Generator().manual_seed(0))
    outputs = torch.ops.fusedecode.logit_stats(logits, None, 1.0, None, topk)
    assert outputs[-1].numel() == (3 if topk else 0)  # topk_confidence, one per row when asked for


@pytest.mark.parametrize("topk", [-1, MAX_TOPK + 1])
def test_native_op_rejects_topk_outside_the_limit(topk):
    logits = torch.randn(1, 3, MAX_TOPK + 8)
    with pytest.raises(RuntimeError, match=rf"topk must be in \[0, {MAX_TOPK}\]"):
        torch.ops.fusedecode.logit_stats(logits, None, 1.0, None, topk)
