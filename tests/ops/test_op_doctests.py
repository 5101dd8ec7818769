"""The docstring examples of every op module (and of fusedecode.tree) run as doctests: each module
must run at least one, so an example turned into plain text cannot pass unnoticed."""

import doctest
import importlib

import pytest

MODULES = ["fusedecode.ops.logit_stats.op", "fusedecode.ops.verify_tree.op", "fusedecode.ops.linear_ce.op",
           "fusedecode.ops.linear_logit_stats.op", "fusedecode.tree"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name), verbose=False)
    assert failures == 0
    assert tried > 0
