"""The docstring examples of every fusedecode.hf module run as doctests (those of the
transformers-free fusedecode.confidence run in test_confidence.py). The examples that generate use
the small bundled models, so they stay fast."""

import doctest
import importlib
import pkgutil

import pytest

pytest.importorskip("transformers", reason="transformers is not installed")

import fusedecode.hf  # noqa: E402

MODULES = ["fusedecode.hf"] + sorted(info.name for info in pkgutil.walk_packages(fusedecode.hf.__path__,
                                                                                "fusedecode.hf."))
# Modules whose docstrings hold examples: each must run at least one (a module left out of the walk,
# or an example turned into plain text, would otherwise pass unnoticed).
WITH_EXAMPLES = {"fusedecode.hf.processors", "fusedecode.hf.speculative.generate", "fusedecode.hf.correction.config",
                 "fusedecode.hf.correction.trigger", "fusedecode.hf.correction.corrector",
                 "fusedecode.hf.correction.generate", "fusedecode.hf.scoring", "fusedecode.hf.deepconf",
                 "fusedecode.hf.reflection"}


def test_every_module_with_examples_is_walked():
    assert WITH_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    failures, tried = doctest.testmod(importlib.import_module(name), verbose=False)
    assert failures == 0
    assert tried > 0 or name not in WITH_EXAMPLES
