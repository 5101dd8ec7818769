"""Hugging Face Hub ``custom_generate`` folders of fusedecode's decoding methods, generated from this
package: ``python -m fusedecode hub-export DIR`` (or ``export(DIR)``) writes, for each method,

    DIR/<folder>/README.md                          the model card
    DIR/<folder>/custom_generate/generate.py        ``generate(model, *args, **kwargs)``, what transformers calls
    DIR/<folder>/custom_generate/requirements.txt   checked by transformers before it runs generate.py

from the templates in ``hub_templates/``. A folder (or a Hub repository holding it) runs with
``model.generate(..., custom_generate=<folder or repo>, trust_remote_code=True)``. Its ``generate.py``
only hands the call to the entry point below, so the method has one implementation, in this
package, and the folder gives the same tokens as the importable callable.
"""

import os
import string
from dataclasses import dataclass

from ._custom_generate import class_generate
from .correction import srgen
from .deepconf import deepconf_generate
from .speculative import tree_speculative

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hub_templates")


def generate_tree_speculation(model, *args, **kwargs):
    """Hub entry point: ``generate`` with ``custom_generate=fusedecode.hf.tree_speculative`` (keywords
    ``draft_model``, ``tree_config``, ``token_streamer``)."""
    return class_generate(model, *args, custom_generate=tree_speculative, **kwargs)


def generate_srgen(model, *args, **kwargs):
    """Hub entry point: ``generate`` with ``custom_generate=fusedecode.hf.srgen`` (keywords
    ``srgen_config``, ``token_streamer``)."""
    return class_generate(model, *args, custom_generate=srgen, **kwargs)


def generate_deepconf(model, *args, **kwargs):
    """Hub entry point: ``fusedecode.hf.deepconf_generate``."""
    return deepconf_generate(model, *args, **kwargs)


@dataclass(frozen=True)
class HubMethod:
    """One exported folder: its name, the entry point its ``generate.py`` calls, the importable callable
    it matches and a one-line title."""

    folder: str
    entry: str
    callable: str
    title: str


METHODS = (
    HubMethod("tree-speculation", "generate_tree_speculation", "fusedecode.hf.tree_speculative",
              "Tree speculative decoding with a draft model"),
    HubMethod("srgen", "generate_srgen", "fusedecode.hf.srgen", "SRGen: entropy-triggered self-correction"),
    HubMethod("deepconf", "generate_deepconf", "fusedecode.hf.deepconf_generate",
              "DeepConf: confidence-filtered reasoning traces with an online early stop"),
)


def _template(name):
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as handle:
        return handle.read()


def render(method):
    """The files of one method's folder: ``{relative path: text}``."""
    values = dict(folder=method.folder, entry=method.entry, callable=method.callable, title=method.title)
    return {
        "README.md": _template(f"{method.folder}.md"),
        "custom_generate/generate.py": string.Template(_template("generate.py.tmpl")).substitute(values),
        "custom_generate/requirements.txt": _template("requirements.txt"),
    }


def export(directory):
    """Write every method's folder under ``directory`` (created if needed, files overwritten); returns
    the written paths."""
    written = []
    for method in METHODS:
        for relative, text in render(method).items():
            path = os.path.join(directory, method.folder, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
            written.append(path)
    return written
