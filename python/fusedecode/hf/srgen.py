"""SRGen: entropy-triggered corrective decoding for ``model.generate`` (Mu et al., 2025).

Each step the model's entropy at the sampling temperature is compared with a threshold drawn from the
row's recent entropies. When it exceeds the threshold, a vector ``delta`` added to the final hidden
state (after the last norm, before ``lm_head``) is optimised for a few AdamW steps so that the context
becomes more likely (cross-entropy of the tokens so far) and the current step less uncertain; the
token is then drawn from ``lm_head(hidden + delta)`` and ``delta`` is dropped. The KV cache is left
untouched because ``delta`` acts after the last layer.

The cross-entropy over the whole context uses ``fusedecode.linear_cross_entropy_entropy``, which never
materialises ``[T, V]`` logits; the context's final hidden states are kept from the forward passes
generation already makes, so a correction never re-runs the model. Models whose logits are not plain
``lm_head(hidden)`` (an lm_head bias, a logit scale, final soft-capping) are handled exactly: the
head's transform is read from the model and checked once against the model's own logits.

The trigger follows the authors' code (SRGen/tnot_decorator.py, ``apply_entropy_control``, driven by
``generate_with_entropy_control`` in SRGen/base_evaluator.py of the official repository): see
``SRGenConfig``.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .. import linear_cross_entropy_entropy, logit_stats
from .._validation import ArgumentTypeError, check_float, check_int
from ..head_transform import apply_head_transform, check_head_transform
from ._transformers_compat import (cache_is_filled, decoder_module, find_cache, output_cache_field,
                                   slices_by_next_sequence_length)

__all__ = ["SRGenConfig", "SRGenOutput", "srgen"]

IGNORE_INDEX = -100
ADAMW_WEIGHT_DECAY = 1e-8
ADAMW_EPS = 1e-5


@dataclass
class SRGenConfig:
    r"""Settings of SRGen's entropy trigger and of its corrective optimisation.

    Per row, each generated step's entropy (at the sampling temperature, on the model's logits) is
    compared with a threshold computed from the row's history of earlier step entropies, and only then
    appended to that history:

    - while the history holds fewer than ``window`` entropies: ``warmup_threshold``;
    - then ``max(mean + k * max(std, min_std), min_threshold)``, mean and unbiased std of the last
      ``window`` entropies before the current step.

    The step whose entropy is above its threshold is corrected (at most ``max_corrections`` times per
    row; later triggers are not acted on). The first generated token, the one the prompt's forward pass
    produces, is neither tested nor recorded: the history starts with the second. This is the rule of
    the authors' code (SRGen/tnot_decorator.py, ``apply_entropy_control``: threshold from
    ``entropy_history[-N:]`` once ``len(entropy_history) >= N``, then append; the prompt stage is never
    tested). There a detection ends the generate call and the next call's prompt stage makes the
    correction, and ``max_retries`` counts detections, the last of which is not corrected:
    ``max_retries=R`` is ``max_corrections=R - 1`` (their ``max_retries=20``: 19 corrections).

    Args:
        window: number of recent step entropies the threshold is computed from (>= 2).
        k: how many standard deviations above the mean an entropy must be to trigger.
        min_std: floor of the standard deviation, so that a flat history does not trigger on noise.
        min_threshold: floor of the threshold (nats).
        warmup_threshold: threshold (nats) while the history is shorter than ``window``.
            ``float("inf")`` in both thresholds disables triggering.
        steps: AdamW steps per correction (>= 1).
        lr: AdamW learning rate (weight decay 1e-8, eps 1e-5).
        entropy_weight: weight ``w`` of the loss ``(1 - w) * CE(context) + w * entropy(current step)``.
        max_corrections: most corrections per row (0 disables SRGen); the authors' ``max_retries``
            minus one.
        context_window: if set, the cross-entropy covers only the last ``context_window`` context
            tokens (the most recent ones), bounding the cost of a correction on long contexts.

    Example::

        >>> from fusedecode.hf import SRGenConfig
        >>> SRGenConfig(k=3.0, max_corrections=5).window
        25
        >>> SRGenConfig(window=1)
        Traceback (most recent call last):
        ...
        ValueError: window must be >= 2, got 1
    """

    window: int = 25
    k: float = 4.0
    min_std: float = 0.5
    min_threshold: float = 1.8
    warmup_threshold: float = 3.0
    steps: int = 3
    lr: float = 0.01
    entropy_weight: float = 0.05
    max_corrections: int = 20
    context_window: Optional[int] = None

    def __post_init__(self):
        check_int("window", self.window, 2)  # an unbiased std needs two entries
        check_float("k", self.k)
        check_float("min_std", self.min_std, low=0.0)
        check_float("min_threshold", self.min_threshold, allow_infinite=True)
        check_float("warmup_threshold", self.warmup_threshold, allow_infinite=True)
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, low=0.0)
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        check_float("entropy_weight", self.entropy_weight, low=0.0, high=1.0)
        check_int("max_corrections", self.max_corrections, 0)
        if self.context_window is not None:
            check_int("context_window", self.context_window, 1)


@dataclass
class SRGenOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``corrections``: one list per row of
    ``(step, entropy_before, entropy_after)``, ``step`` counting generated tokens from 0. ``logits``
    (with ``output_logits=True``) holds, for corrected rows, the corrected logits the token came from."""

    corrections: Optional[List[List[Tuple[int, float, float]]]] = None


class EntropyTrigger:
    """SRGen's trigger rule (see ``SRGenConfig``) for every row of a batch, kept on the device.

    ``update`` is called once per generated step, the first call being the step of the prompt's
    forward pass (never tested nor recorded). The last ``window`` entropies of each row live in a ring
    buffer; mean and std are taken only once it is full, so the ring order never matters.
    ``threshold`` holds each row's threshold at the last ``update`` and ``corrections`` how many
    triggers each row has been granted.

    Example::

        >>> trigger = EntropyTrigger(SRGenConfig(window=4, k=1.0, min_std=0.0, min_threshold=0.0,
        ...                                      warmup_threshold=9.0), batch_size=1, device="cpu")
        >>> active = torch.tensor([True])
        >>> [bool(trigger.update(torch.tensor([e]), active)) for e in (9.5, 1.0, 1.0, 1.0, 3.0, 5.0)]
        [False, False, False, False, False, True]
        >>> trigger.threshold  # mean 1.5 + 1 * std 1 of the window [1, 1, 1, 3] before the step
        tensor([2.5000])
    """

    def __init__(self, config, batch_size, device):
        self.config = config
        self.history = torch.zeros(batch_size, config.window, dtype=torch.float32, device=device)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.corrections = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.threshold = torch.full((batch_size,), config.warmup_threshold, device=device)
        self.seen_prompt_step = False

    def update(self, entropy, active):
        """Tests ``entropy`` ``[B]`` of the ``active`` rows against their thresholds, then adds it to
        their histories; returns ``[B]`` bool: the rows to correct at this step (above the threshold,
        corrections left). Finished rows keep their history unchanged."""
        config = self.config
        if not self.seen_prompt_step:
            self.seen_prompt_step = True
            return torch.zeros_like(active)
        entropy = entropy.float()
        self.threshold = self._threshold()
        slot = (self.count % config.window).unsqueeze(1)
        written = self.history.scatter(1, slot, entropy.unsqueeze(1))
        self.history = torch.where(active.unsqueeze(1), written, self.history)
        self.count = self.count + active.long()
        correct = active & (entropy > self.threshold) & (self.corrections < config.max_corrections)
        self.corrections = self.corrections + correct.long()
        return correct

    def _threshold(self):
        """Each row's threshold from the entropies recorded so far (the current one not yet)."""
        config = self.config
        spread = self.history.std(dim=1).clamp(min=config.min_std)
        threshold = (self.history.mean(dim=1) + config.k * spread).clamp(min=config.min_threshold)
        return torch.where(self.count >= config.window, threshold, torch.full_like(threshold, config.warmup_threshold))


class HiddenBuffer:
    """The final hidden states of every position of the sequences, ``[B, length, H]``, grown by one
    position per step with amortised doubling (no re-copy of the whole context each step)."""

    def __init__(self, prompt_hidden):
        self.storage = prompt_hidden.contiguous()
        self.length = prompt_hidden.shape[1]

    def append(self, step_hidden):
        """Adds ``[B, H]`` as the next position."""
        if self.length == self.storage.shape[1]:
            grown = self.storage.new_zeros(self.storage.shape[0], max(2 * self.length, 16), self.storage.shape[2])
            grown[:, :self.length] = self.storage[:, :self.length]
            self.storage = grown
        self.storage[:, self.length] = step_hidden
        self.length += 1

    def view(self, rows, start):
        """``[len(rows), length - start, H]``: positions ``start..length-1`` of ``rows``."""
        return self.storage[rows, start:self.length]


def context_targets(input_ids, attention_mask, rows, start):
    """Targets of positions ``start..L-1`` of ``rows`` (``L = input_ids.shape[1]``): position ``t``
    predicts token ``t + 1``; padding and the last position (the current step, whose token is not
    known yet) get ``IGNORE_INDEX``.

    Example::

        >>> ids, mask = torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 1, 1]])
        >>> context_targets(ids, mask, torch.tensor([0]), 0)
        tensor([[-100,    6,    7, -100]])
    """
    ids, mask = input_ids[rows], attention_mask[rows].bool()
    valid = mask[:, :-1] & mask[:, 1:]
    targets = torch.where(valid, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    targets = torch.cat([targets, torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    return targets[:, start:]


def optimise_delta(context_hidden, targets, head, config, temperature):
    """SRGen's corrective vector for each row of ``context_hidden`` ``[n, T, H]``, whose last position
    is the current step: ``steps`` AdamW steps from zero on
    ``(1 - entropy_weight) * CE(context) + entropy_weight * entropy(current step at temperature)``,
    the logits being the model's own (``head``: an ``OutputHead``, transform included).
    Returns ``[n, H]`` float32. Adam is elementwise and the loss a sum over rows, so rows stay
    independent."""
    # Generation may run under inference_mode, whose tensors cannot be saved for backward.
    with torch.inference_mode(False), torch.enable_grad():
        if context_hidden.is_inference():
            context_hidden, targets = context_hidden.clone(), targets.clone()
        weight, bias = head.detached()
        delta = torch.zeros(context_hidden.shape[0], context_hidden.shape[2], dtype=torch.float32,
                            device=context_hidden.device, requires_grad=True)
        optimizer = torch.optim.AdamW([delta], lr=config.lr, weight_decay=ADAMW_WEIGHT_DECAY, eps=ADAMW_EPS)
        for _ in range(config.steps):
            optimizer.zero_grad(set_to_none=True)
            cross_entropy, entropy = linear_cross_entropy_entropy(
                context_hidden, weight, targets, delta=delta, bias=bias, logit_scale=head.transform.logit_scale,
                softcap=head.transform.softcap, temperature=temperature, ignore_index=IGNORE_INDEX)
            loss = ((1 - config.entropy_weight) * cross_entropy + config.entropy_weight * entropy).sum()
            loss.backward()
            optimizer.step()
    return delta.detach()


def corrected_logits(step_hidden, delta, head):
    """The model's logits for ``hidden + delta`` as float32 ``[n, V]``: ``lm_head(hidden)`` plus
    ``delta @ weight.T``, then the head's transform (``head``: an ``OutputHead``). As in
    ``linear_cross_entropy_entropy``, the small ``delta`` is never added to half-precision hidden
    states, where it would be rounded away; with ``delta = 0`` this is the model's own logits (in
    float32, the same operations)."""
    weight, bias = head.weight, head.transform.bias
    logits = torch.nn.functional.linear(step_hidden.to(weight.dtype), weight, bias).float()
    if delta is not None:
        logits = logits + torch.nn.functional.linear(delta.to(weight.dtype), weight).float()
    return apply_head_transform(logits, head.transform.logit_scale, head.transform.softcap)


class OutputHead:
    """The model's output layer as srgen uses it: the lm_head ``weight`` ``[V, H]`` and the transform
    from ``lm_head``'s input to the model's logits (``transform``: a ``HeadTransform`` of the lm_head
    bias, a logit scale and a soft-cap, each None when absent)."""

    def __init__(self, weight, transform):
        self.weight, self.transform = weight, transform

    def detached(self):
        """``(weight, bias)`` detached (never accumulate into the model's ``.grad``) and, under
        inference_mode, cloned so that autograd may save them."""
        tensors = []
        for tensor in (self.weight, self.transform.bias):
            if tensor is not None:
                tensor = tensor.detach()
                if tensor.is_inference():
                    tensor = tensor.clone()
            tensors.append(tensor)
        return tuple(tensors)

    def describe(self):
        parts = ["bias" if self.transform.bias is not None else None,
                 f"logit scale {self.transform.logit_scale:g}" if self.transform.logit_scale is not None else None,
                 f"soft-cap {self.transform.softcap:g}" if self.transform.softcap is not None else None]
        parts = [part for part in parts if part]
        return "lm_head(h)" + (" with " + ", ".join(parts) if parts else "")


def _config_head_transform(config):
    """``(logit_scale, softcap)`` of a model's head, read from its (text) config. Each entry was
    checked against the model's forward in transformers 4.57, 5.17 and 5.24; whatever is missed here
    is caught by ``_check_head``, which compares the reconstruction with the model's logits."""
    model_type = getattr(config, "model_type", "") or ""
    logit_scale = softcap = None
    # Gemma 2/3/3n, VaultGemma, nanochat: softcap * tanh(logits / softcap).
    if getattr(config, "final_logit_softcapping", None) is not None:
        softcap = config.final_logit_softcapping
    if model_type == "recurrent_gemma" and getattr(config, "logits_soft_cap", None) is not None:
        softcap = config.logits_soft_cap
    # Cohere, Cohere2 (+ MoE): logits * logit_scale.
    if model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        logit_scale = config.logit_scale
    # logits_scaling divides the logits in the Granite family and MiniCPM3 (which divides the hidden
    # states before a bias-free lm_head: the same thing) and multiplies them in HyperCLOVA X.
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and (model_type.startswith("granite") or model_type == "minicpm3"):
        logit_scale = 1.0 / scaling
    if scaling is not None and model_type == "hyperclovax":
        logit_scale = scaling
    return logit_scale, softcap


def _output_head(model):
    """The model's ``OutputHead``: ``get_output_embeddings()`` (a linear layer, bias allowed) and the
    logit transform its config declares."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError("srgen needs a model whose get_output_embeddings() is a linear layer with a [V, H] weight")
    bias = getattr(head, "bias", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    logit_scale, softcap = _config_head_transform(config)
    try:
        transform = check_head_transform(bias, logit_scale, softcap, weight)
    except ValueError as error:  # also ArgumentTypeError
        raise ValueError(f"srgen cannot use this model's output layer: {error}") from None
    return OutputHead(weight, transform)


def _check_supported(model, generation_config, model_kwargs):
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError("srgen supports decoder-only models; this model is an encoder-decoder")
    if (generation_config.num_beams or 1) > 1:
        raise ValueError(f"srgen does not support beam search (num_beams={generation_config.num_beams}); "
                         "use greedy decoding or sampling")
    if getattr(generation_config, "prefill_chunk_size", None) is not None:
        raise ValueError("srgen does not support prefill_chunk_size")
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("srgen needs input_ids (the context tokens), not inputs_embeds")
    cache = find_cache(model_kwargs)
    if cache is not None and cache_is_filled(cache):
        raise ValueError("srgen needs the final hidden state of every context position: pass no cache or an "
                         "empty one, not a filled past_key_values")


def _slices_by_next_sequence_length(model):
    """True for transformers >= 5, whose input preparation slices by ``next_sequence_length``;
    transformers 4 slices by ``cache_position`` instead. Decided by the release, whatever ``model``
    overrides (Phi3, Bloom, Mamba, ... override ``prepare_inputs_for_generation`` with ``**kwargs``)."""
    return slices_by_next_sequence_length()


class FinalHiddenCapture:
    """Keeps the output of the model's decoder (``model.get_decoder()``: the stack up to and including
    the last norm), i.e. what ``lm_head`` is applied to, for every position of each forward pass.

    A forward hook rather than ``output_hidden_states=True``, which would also return every layer's
    states: ``num_layers`` times the ``[B, T, H]`` needed, gigabytes for a long prompt.
    """

    def __init__(self, model):
        decoder = decoder_module(model)
        if decoder is None:
            raise ValueError("srgen needs model.get_decoder() or model.base_model (the transformer under lm_head) to "
                             "read the final hidden states")
        self.hidden = None
        self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def take(self):
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the model's forward did not run its decoder (model.get_decoder())")
        return hidden

    def remove(self):
        self.handle.remove()


def _forward(model, input_ids, model_kwargs, is_prefill, transformers5, output_attentions, output_hidden_states):
    """One forward pass through the model's own input preparation and cache, as ``_sample`` makes it."""
    if transformers5:
        extra = {"is_first_iteration": True} if is_prefill else {
            "next_sequence_length": 1 if model_kwargs.get("use_cache", True) else None}
        model_inputs = model.prepare_inputs_for_generation(input_ids, **extra, **model_kwargs)
    else:
        if is_prefill:  # _update_model_kwargs_for_generation advances it from here
            model_kwargs["cache_position"] = torch.arange(input_ids.shape[1], device=input_ids.device)
        model_inputs = model.prepare_inputs_for_generation(input_ids, **model_kwargs)
    if output_hidden_states:
        model_inputs["output_hidden_states"] = True
    if output_attentions:
        model_inputs["output_attentions"] = True
    return model(**model_inputs, return_dict=True)


def _check_head(logits, hidden, head):
    """Corrected logits are the head's reconstruction for ``hidden + delta``: refuse a model whose
    logits (at ``delta = 0``) are something else, an output transform srgen does not know, which would
    make corrected and uncorrected logits incomparable. One comparison, on the prompt's last position."""
    recomputed = corrected_logits(hidden, None, head)
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 2e-2
    scale = logits.abs().max().clamp(min=1)
    if recomputed.shape != logits.shape or not torch.allclose(recomputed, logits, rtol=tolerance,
                                                              atol=tolerance * scale):
        raise ValueError(f"srgen reconstructs this model's logits as {head.describe()} from the final hidden "
                         "state (get_output_embeddings() and the config's logit transform), but the model's own "
                         "logits differ: its head transforms the logits in a way srgen does not know")


def _pad_token(generation_config, device):
    pad_token_id = generation_config.pad_token_id
    if pad_token_id is None:
        eos = generation_config.eos_token_id
        pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return None if pad_token_id is None else torch.as_tensor(pad_token_id, device=device)


class Corrector:
    """SRGen's state across the steps of one ``generate`` call: the context's final hidden states,
    the entropy trigger, and the corrections made so far (``corrections``, one list per row)."""

    def __init__(self, config, head, temperature, input_ids):
        batch_size = input_ids.shape[0]
        self.config, self.head, self.temperature = config, head, temperature
        self.prompt_length = input_ids.shape[1]
        self.trigger = EntropyTrigger(config, batch_size, input_ids.device)
        self.corrections = [[] for _ in range(batch_size)]
        self.buffer = None

    def observe(self, final_hidden, attention_mask, is_prefill, logits):
        """Keeps the final hidden states of the positions the forward pass just ran."""
        if is_prefill:
            _check_head(logits, final_hidden[:, -1], self.head)
            # Padding positions may hold anything (even NaN); their targets are ignored anyway.
            self.buffer = HiddenBuffer(final_hidden.masked_fill(~attention_mask.bool().unsqueeze(-1), 0))
        else:
            self.buffer.append(final_hidden[:, -1])

    def correct(self, input_ids, attention_mask, logits, active):
        """Replaces, in place, the float32 ``logits`` ``[B, V]`` of the ``active`` rows the trigger
        picks by their corrected logits, and records the corrections."""
        config = self.config
        entropy = logit_stats(logits, temperature=self.temperature).entropy
        rows = self.trigger.update(entropy, active).nonzero().flatten()
        if not rows.numel():
            return
        length = input_ids.shape[1]
        start = max(0, length - 1 - config.context_window) if config.context_window else 0
        targets = context_targets(input_ids, attention_mask[:, :length], rows, start)
        context = self.buffer.view(rows, start)
        delta = optimise_delta(context, targets, self.head, config, self.temperature)
        logits[rows] = corrected_logits(context[:, -1], delta, self.head)
        entropy_after = logit_stats(logits[rows], temperature=self.temperature).entropy
        for row, before, after in zip(rows.tolist(), entropy[rows].tolist(), entropy_after.tolist()):
            self.corrections[row].append((length - self.prompt_length, before, after))


class StepRecord:
    """The per-step outputs ``return_dict_in_generate`` asks for, as ``_sample`` keeps them
    (``None`` for those not asked)."""

    def __init__(self, generation_config):
        wanted = generation_config.return_dict_in_generate
        self.scores = () if wanted and generation_config.output_scores else None
        self.logits = () if wanted and generation_config.output_logits else None
        self.attentions = () if wanted and generation_config.output_attentions else None
        self.hidden_states = () if wanted and generation_config.output_hidden_states else None

    def add(self, scores, logits, outputs):
        if self.scores is not None:
            self.scores += (scores,)
        if self.logits is not None:
            self.logits += (logits,)
        if self.attentions is not None:
            self.attentions += (outputs.attentions,)
        if self.hidden_states is not None:
            self.hidden_states += (outputs.hidden_states,)


def srgen(model, input_ids, logits_processor, stopping_criteria, generation_config, srgen_config=None,
          srgen_streamer=None, **model_kwargs):
    r"""SRGen decoding as a ``custom_generate`` callable of ``model.generate`` (greedy or sampling).

    Called by ``generate`` after it has prepared the logits processors, stopping criteria, cache and
    model inputs; the extra ``generate`` keywords ``srgen_config`` and ``srgen_streamer`` are routed
    here. Without a trigger the output is token for token that of plain ``generate`` (same torch seed
    when sampling). See ``SRGenConfig`` for the trigger and the correction.

    Args:
        srgen_config: an ``SRGenConfig`` (default: ``SRGenConfig()``).
        srgen_streamer: a streamer (``TextStreamer``, ...). transformers does not hand the usual
            ``streamer=`` of ``generate`` to a ``custom_generate`` callable (it would only receive the
            prompt and never ``end()``), so pass it as ``srgen_streamer=`` instead: it gets the prompt,
            every new token, then ``end()``.

    Returns:
        The sequences ``[B, prompt + new]`` (LongTensor), or with ``return_dict_in_generate=True`` an
        ``SRGenOutput`` whose ``corrections`` lists ``(step, entropy_before, entropy_after)`` per row.

    Example::

        >>> import fusedecode.hf
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> path = fusedecode.hf.bundled_model_path("target")
        >>> model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        >>> inputs = tokenizer(["47+385="], return_tensors="pt")
        >>> out = model.generate(**inputs, custom_generate=fusedecode.hf.srgen, do_sample=True, temperature=0.6,
        ...                      srgen_config=fusedecode.hf.SRGenConfig(), max_new_tokens=40,
        ...                      return_dict_in_generate=True)
        >>> len(out.corrections)
        1
    """
    config = SRGenConfig() if srgen_config is None else srgen_config
    if not isinstance(config, SRGenConfig):
        raise ArgumentTypeError(f"srgen_config must be a fusedecode.hf.SRGenConfig, got {type(config).__name__}")
    _check_supported(model, generation_config, model_kwargs)
    do_sample = generation_config.do_sample
    temperature = float(generation_config.temperature or 1.0) if do_sample else 1.0
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    pad_token_id = _pad_token(generation_config, input_ids.device)
    if has_eos_stopping_criteria and pad_token_id is None:
        raise ValueError("stopping at EOS needs a pad_token_id (or an eos_token_id) in the generation config")
    record = StepRecord(generation_config)
    corrector = Corrector(config, _output_head(model), temperature, input_ids)
    if srgen_streamer is not None:
        srgen_streamer.put(input_ids.cpu())
    is_prefill, transformers5 = True, _slices_by_next_sequence_length(model)
    capture = FinalHiddenCapture(model)
    try:
        input_ids, model_kwargs = _decode_loop(model, input_ids, model_kwargs, logits_processor, stopping_criteria,
                                               do_sample, has_eos_stopping_criteria, pad_token_id, record, corrector,
                                               capture, srgen_streamer, is_prefill, transformers5)
    finally:
        capture.remove()
    if srgen_streamer is not None:
        srgen_streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    cache = {output_cache_field(SRGenOutput): find_cache(model_kwargs)}  # ``cache`` in transformers >= 5.2x
    return SRGenOutput(sequences=input_ids, scores=record.scores, logits=record.logits, attentions=record.attentions,
                       hidden_states=record.hidden_states, corrections=corrector.corrections, **cache)


def _decode_loop(model, input_ids, model_kwargs, logits_processor, stopping_criteria, do_sample,
                 has_eos_stopping_criteria, pad_token_id, record, corrector, capture, srgen_streamer, is_prefill,
                 transformers5):
    """``_sample``'s loop with SRGen's correction between the forward pass and the token choice."""
    unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        outputs = _forward(model, input_ids, model_kwargs, is_prefill, transformers5, record.attentions is not None,
                           record.hidden_states is not None)
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        corrector.observe(capture.take(), attention_mask, is_prefill, next_token_logits)
        is_prefill = False
        corrector.correct(input_ids, attention_mask, next_token_logits, unfinished_sequences.bool())

        next_token_scores = logits_processor(input_ids, next_token_logits)
        record.add(next_token_scores, next_token_logits, outputs)
        if do_sample:
            probs = torch.nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:
            next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        if srgen_streamer is not None:
            srgen_streamer.put(next_tokens.cpu())
        unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, record.scores)
        del outputs
        if unfinished_sequences.max() == 0:
            return input_ids, model_kwargs
