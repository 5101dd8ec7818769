"""The Hub ``custom_generate`` folders under examples/hub: generated from the package (byte for byte),
and each, loaded from its local path by ``model.generate(custom_generate=<path>, trust_remote_code=True)``,
gives exactly the tokens of the importable callable."""

import filecmp
import functools
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import fusedecode.hf  # noqa: E402
from fusedecode.hf import ConfidenceStopping, SRGenConfig, TreeConfig, hub  # noqa: E402
from hf_models import EOS, prompts, tiny_model  # noqa: E402

HUB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "hub")
FOLDERS = {method.folder: os.path.join(HUB, method.folder) for method in hub.METHODS}
# Entropies of the tiny models are below log(96) < 5 nats: this trigger fires at every step.
SRGEN_ALWAYS = SRGenConfig(k=-100.0, min_std=1.0, min_threshold=-1.0, warmup_threshold=-1.0, max_corrections=3)


def _files(root):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root) for name in names if "__pycache__" not in folder)


def test_committed_folders_are_the_export(tmp_path):
    """examples/hub is what `python -m fusedecode hub-export examples/hub` writes: same files, same bytes
    (regenerate it after changing the templates)."""
    written = hub.export(str(tmp_path))
    assert len(written) == 3 * len(hub.METHODS)
    assert _files(HUB) == _files(str(tmp_path))
    for relative in _files(HUB):
        assert filecmp.cmp(os.path.join(HUB, relative), os.path.join(tmp_path, relative), shallow=False), relative


def test_cli_export(tmp_path):
    from fusedecode.__main__ import main

    assert main(["hub-export", str(tmp_path / "out")]) == 0
    assert _files(str(tmp_path / "out")) == _files(HUB)


def test_folder_layout():
    """What transformers looks for: custom_generate/generate.py defining generate(model, *args, **kwargs),
    its requirements (fusedecode among them), a model card with the custom_generate tag."""
    for folder, path in FOLDERS.items():
        with open(os.path.join(path, "custom_generate", "requirements.txt")) as handle:
            requirements = handle.read().split()
        assert any(line.startswith("fusedecode") for line in requirements), folder
        with open(os.path.join(path, "README.md")) as handle:
            card = handle.read()
        assert card.startswith("---\n") and "- custom_generate\n" in card.split("---")[1], folder
        namespace = {}
        with open(os.path.join(path, "custom_generate", "generate.py")) as handle:
            exec(compile(handle.read(), "generate.py", "exec"), namespace)
        assert callable(namespace["generate"]), folder


# Tiny models: one thread (tests/hf/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _load(model, folder, seed, **kwargs):
    torch.manual_seed(seed)
    return model.generate(custom_generate=FOLDERS[folder], trust_remote_code=True, **kwargs)


def _call(model, seed, **kwargs):
    torch.manual_seed(seed)
    return model.generate(**kwargs)


@pytest.mark.parametrize("do_sample", [False, True])
def test_tree_speculation_folder(do_sample):
    target = tiny_model("llama", seed=1)
    inputs = prompts(3, 5, seed=1)
    # The target drafts for itself: deep acceptance, so the tree walk really runs.
    kwargs = dict(inputs, draft_model=target, tree_config=TreeConfig(max_depth=4, top_k=2, max_nodes=8),
                  max_new_tokens=12, do_sample=do_sample, pad_token_id=0, return_dict_in_generate=True)
    loaded = _load(target, "tree-speculation", 5, **kwargs)
    direct = _call(target, 5, custom_generate=fusedecode.hf.tree_speculative, **kwargs)
    assert type(loaded).__name__ == "TreeSpeculativeOutput"
    assert torch.equal(loaded.sequences, direct.sequences)
    assert torch.equal(loaded.num_accepted, direct.num_accepted)
    if not do_sample:
        assert loaded.mean_accepted_length > 2
        plain = target.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.sequences, plain)


def test_srgen_folder():
    model = tiny_model("llama", seed=3)
    inputs = prompts(2, 5, seed=3)
    kwargs = dict(inputs, srgen_config=SRGEN_ALWAYS, do_sample=True, temperature=0.8, max_new_tokens=8,
                  pad_token_id=0, return_dict_in_generate=True)
    loaded = _load(model, "srgen", 11, **kwargs)
    direct = _call(model, 11, custom_generate=fusedecode.hf.srgen, **kwargs)
    assert torch.equal(loaded.sequences, direct.sequences)
    assert loaded.corrections == direct.corrections
    assert len(loaded.corrections[0]) == 3  # the corrections really ran (row 1 draws EOS at once)


def test_deepconf_folder_is_confidence_stopping():
    """The folder's online stop gives exactly the tokens of ConfidenceStopping passed by hand, and the
    callable's; a threshold between the traces' lowest group confidences stops some rows only."""
    model = tiny_model("qwen2", seed=2)
    common = dict(prompts(2, 5, seed=2), do_sample=True, max_new_tokens=16, num_return_sequences=4, pad_token_id=0,
                  eos_token_id=EOS)
    options = dict(enable_conf=True, window_size=4, conf_topk=8)
    free = _load(model, "deepconf", 2, enable_early_stopping=False, return_dict_in_generate=True,
                 **options, **common)
    threshold = float(free.lowest_group_confidences.median())
    loaded = _load(model, "deepconf", 2, threshold=threshold, output_confidences=True, return_dict_in_generate=True,
                   **options, **common)
    torch.manual_seed(2)
    callable_out = fusedecode.hf.deepconf_generate(model, threshold=threshold, output_confidences=True,
                                                   return_dict_in_generate=True, **options, **common)
    stopper = ConfidenceStopping(window=4, threshold=threshold, topk=8, eos_token_id=EOS)
    by_hand = _call(model, 2, logits_processor=[stopper.processor], stopping_criteria=[stopper], **common)
    assert torch.equal(loaded.sequences, by_hand)
    assert torch.equal(callable_out.sequences, by_hand)
    assert torch.equal(loaded.stopped, stopper.stopped)
    assert 0 < int(loaded.stopped.sum()) < loaded.sequences.shape[0]
    assert torch.equal(loaded.confidences.isnan(), callable_out.confidences.isnan())


def test_deepconf_folder_warmup():
    model = tiny_model("qwen2", seed=2)
    kwargs = dict(prompts(2, 5, seed=6), enable_conf=True, window_size=3, deepconf_variant="high",
                  deepconf_warmup_traces=4, do_sample=True, num_return_sequences=3, max_new_tokens=12, pad_token_id=0,
                  eos_token_id=EOS, return_dict_in_generate=True)
    loaded = _load(model, "deepconf", 9, **kwargs)
    torch.manual_seed(9)
    direct = fusedecode.hf.deepconf_generate(model, **kwargs)
    for field in ("sequences", "warmup_sequences", "stopped", "threshold", "lowest_group_confidences",
                  "warmup_lowest_group_confidences"):
        assert torch.equal(getattr(loaded, field), getattr(direct, field)), field


def test_folder_inside_a_model_whose_generate_it_replaced():
    """A model loaded from a repository with a custom_generate folder has its instance generate replaced
    by the folder's function (transformers does this in from_pretrained); the entry points call the
    class's generate, not themselves."""
    model = tiny_model("llama", seed=4)
    inputs = prompts(1, 5, seed=4)
    expected = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for entry, extra in ((hub.generate_tree_speculation, dict(draft_model=model)),
                         (hub.generate_srgen, dict(srgen_config=SRGenConfig(min_threshold=math.inf,
                                                                            warmup_threshold=math.inf))),
                         (hub.generate_deepconf, dict(enable_conf=True, threshold=-1e9, window_size=4))):
        model.generate = functools.partial(entry, model=model)
        try:
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0, **extra)
        finally:
            del model.generate
        assert torch.equal(out, expected), entry.__name__
