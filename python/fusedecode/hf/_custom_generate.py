"""What fusedecode's ``custom_generate`` callables (``srgen``, ``tree_speculative``) share.

``model.generate(..., custom_generate=f)`` prepares the logits processors, stopping criteria, special
tokens and model inputs, then calls ``f``. It hands ``f`` only the keywords that ``f`` declares and
``GenerationMixin._sample`` does not (so never ``streamer=``: generate puts the prompt into it and
nothing else), which is why both callables take their streamer as ``token_streamer=``.
"""

import warnings

import torch

from .._validation import ArgumentTypeError


def check_config(keyword, config, config_class):
    """The callable's settings object: ``config_class()`` when ``config`` is None, else ``config``
    itself, which must be a ``config_class``."""
    if config is None:
        return config_class()
    if not isinstance(config, config_class):
        raise ArgumentTypeError(f"{keyword} must be a fusedecode.hf.{config_class.__name__}, "
                                f"got {type(config).__name__}")
    return config


def class_generate(model, *args, **kwargs):
    """``generate`` of the model's class. A model loaded with ``trust_remote_code=True`` from a repository
    that ships a ``custom_generate`` folder has its instance ``generate`` replaced by that folder's
    function; a wrapper that calls ``model.generate`` from inside such a function would call itself."""
    return type(model).generate(model, *args, **kwargs)


def refuse_unsupported_generation(method, generation_config, model_kwargs):
    """Refuse, before any forward, what neither callable does: beam search and ``inputs_embeds``
    (both need the context as token ids)."""
    num_beams = getattr(generation_config, "num_beams", 1) or 1
    if num_beams > 1:
        raise ValueError(f"{method} does not support beam search (num_beams={num_beams}); "
                         "use greedy decoding or sampling")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"{method} needs input_ids (the context tokens), not inputs_embeds")


def refuse_encoder_decoder(method, model, subject):
    """Both callables run decoder-only models; ``subject`` names ``model`` in the message."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{method} supports decoder-only models; {subject} is an encoder-decoder")


def pad_token_id(generation_config):
    """The id finished rows are padded with, as ``generate`` picks it: ``pad_token_id``, else the
    (first) ``eos_token_id``; None when the config has neither."""
    pad = generation_config.pad_token_id
    if pad is None:
        eos = generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return None if pad is None else int(pad)


def eos_token_ids(generation_config):
    """The end-of-sequence ids of ``generation_config`` (``eos_token_id``: None, an int, a list or a
    tensor) as a frozenset of ints."""
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    if hasattr(eos, "tolist"):
        eos = eos.tolist()
    return frozenset(int(token) for token in (eos if isinstance(eos, (list, tuple)) else [eos]))


def sampling_temperature(generation_config):
    """The temperature tokens are drawn at: the config's when sampling (its processors apply it), 1
    for greedy decoding."""
    return float(generation_config.temperature or 1.0) if generation_config.do_sample else 1.0


def deprecated_streamer_keyword(token_streamer, old_streamer, old_keyword):
    """``token_streamer``, or the streamer passed under ``old_keyword``, its deprecated name."""
    if old_streamer is None:
        return token_streamer
    if token_streamer is not None:
        raise ValueError(f"pass the streamer as token_streamer= only, not also as {old_keyword}=")
    warnings.warn(f"{old_keyword}= is deprecated, pass token_streamer= instead", DeprecationWarning, stacklevel=3)
    return old_streamer


class TokenStream:
    """The ``token_streamer`` of a call (a transformers ``BaseStreamer``, or None for no streaming):
    it gets the prompt, then the new tokens as they are emitted, then ``end()``."""

    def __init__(self, streamer, prompt_ids=None):
        self.streamer = streamer
        if streamer is not None and prompt_ids is not None:
            streamer.put(prompt_ids.cpu())

    def put(self, tokens):
        """New tokens (one per row, or one row's accepted run): a tensor on any device or a list of
        ids, handed to the streamer as a CPU tensor (no copy when there is no streamer)."""
        if self.streamer is not None:
            is_tensor = isinstance(tokens, torch.Tensor)
            self.streamer.put(tokens.cpu() if is_tensor else torch.tensor(tokens, dtype=torch.long))

    def end(self):
        if self.streamer is not None:
            self.streamer.end()
