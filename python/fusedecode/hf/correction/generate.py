"""``srgen``: the ``custom_generate`` entry point of SRGen: ``_sample``'s decode loop with SRGen's
correction between each forward pass and the token choice."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .._custom_generate import (TokenStream, check_config, deprecated_streamer_keyword, pad_token_id,
                                refuse_encoder_decoder, refuse_unsupported_generation, sampling_temperature)
from ..models.cache import cache_is_filled, find_cache, output_cache_field
from ..models.forward import slices_by_next_sequence_length
from ..models.head import read_output_head
from ..models.hidden import FinalHiddenCapture
from ..reflection import ReflectionProcessor
from .config import SRGenConfig
from .corrector import Corrector


@dataclass
class SRGenOutput(GenerateDecoderOnlyOutput):
    """``generate`` output of ``srgen`` with ``return_dict_in_generate=True``: a
    ``GenerateDecoderOnlyOutput`` plus ``corrections``, one list per row of
    ``(step, entropy_before, entropy_after)``, ``step`` counting generated tokens from 0. ``logits``
    (with ``output_logits=True``) holds, for corrected rows, the corrected logits the token came from."""

    corrections: Optional[List[List[Tuple[int, float, float]]]] = None


def srgen(model, input_ids, logits_processor, stopping_criteria, generation_config, srgen_config=None,
          srgen_streamer=None, token_streamer=None, **model_kwargs):
    r"""SRGen decoding as a ``custom_generate`` callable of ``model.generate`` (greedy or sampling).

    Called by ``generate`` after it has prepared the logits processors, stopping criteria, cache and
    model inputs; the extra ``generate`` keywords ``srgen_config`` and ``token_streamer`` are routed
    here. Without a trigger the output is token for token that of plain ``generate`` (same torch seed
    when sampling). See ``SRGenConfig`` for the trigger and the correction.

    Args:
        srgen_config: an ``SRGenConfig`` (default: ``SRGenConfig()``).
        token_streamer: a streamer (``TextStreamer``, ...). transformers does not hand the usual
            ``streamer=`` of ``generate`` to a ``custom_generate`` callable (it would only receive the
            prompt and never ``end()``), so pass it as ``token_streamer=`` instead (as with
            ``tree_speculative``): it gets the prompt, every new token, then ``end()``.
        srgen_streamer: the former name of ``token_streamer``, deprecated (a ``DeprecationWarning``).

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
    config = check_config("srgen_config", srgen_config, SRGenConfig)
    token_streamer = deprecated_streamer_keyword(token_streamer, srgen_streamer, "srgen_streamer")
    _check_supported(model, generation_config, model_kwargs)
    choice = TokenChoice(generation_config, logits_processor, stopping_criteria)
    record = StepRecord(generation_config)
    head = read_output_head(model, user="srgen")
    stream = TokenStream(token_streamer, input_ids)
    with FinalHiddenCapture(model, user="srgen") as capture:
        corrector = Corrector(config, head, sampling_temperature(generation_config), input_ids, capture)
        input_ids, model_kwargs = _decode_loop(model, input_ids, model_kwargs, choice, corrector, record, stream)
    stream.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    cache = {output_cache_field(SRGenOutput): find_cache(model_kwargs)}  # ``cache`` in transformers >= 5.2x
    return SRGenOutput(sequences=input_ids, scores=record.scores, logits=record.logits, attentions=record.attentions,
                       hidden_states=record.hidden_states, corrections=corrector.corrections, **cache)


def _check_supported(model, generation_config, model_kwargs):
    """Refuse, before any forward, what srgen cannot run."""
    refuse_encoder_decoder("srgen", model, "this model")
    refuse_unsupported_generation("srgen", generation_config, model_kwargs)
    if getattr(generation_config, "prefill_chunk_size", None) is not None:
        raise ValueError("srgen does not support prefill_chunk_size")
    cache = find_cache(model_kwargs)
    if cache is not None and cache_is_filled(cache):
        raise ValueError("srgen needs the final hidden state of every context position: pass no cache or an "
                         "empty one, not a filled past_key_values")


def _decode_loop(model, input_ids, model_kwargs, choice, corrector, record, stream):
    """``_sample``'s loop with SRGen's correction between the forward pass and the token choice;
    returns the sequences and the final model kwargs (their cache)."""
    forward = ForwardPass(model, record)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        prefill = forward.is_prefill
        outputs = forward(input_ids, model_kwargs)
        attention_mask = model_kwargs.get("attention_mask")  # the context's, before this step's token
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
        active = unfinished.bool()
        if not prefill:
            active = active & ~_inserted_rows(choice.logits_processor, active)
        corrector.step(input_ids, attention_mask, logits, active)
        scores = choice.scores(input_ids, logits)
        record.add(scores, logits, outputs)
        next_tokens = choice.tokens(scores, unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        stream.put(next_tokens)
        unfinished = unfinished & ~choice.stopping_criteria(input_ids, record.scores)
        del outputs
        if unfinished.max() == 0:
            return input_ids, model_kwargs


def _inserted_rows(logits_processor, active):
    """``[B]`` bool: rows whose token at this step a ``ReflectionInsertion`` forces (SRGen neither tests
    nor corrects them, as the insertion rule does not test inserted tokens), as far as known before
    the processors run."""
    inserted = torch.zeros_like(active)
    for processor in logits_processor:
        if isinstance(processor, ReflectionProcessor):
            rows = processor.forcing_rows()
            if rows is not None:
                inserted = inserted | rows
    return inserted


class ForwardPass:
    """``_sample``'s forward pass through the model's own input preparation and cache; the first
    call is the prefill."""

    def __init__(self, model, record):
        self.model = model
        self.transformers5 = slices_by_next_sequence_length()
        self.output_attentions = record.attentions is not None
        self.output_hidden_states = record.hidden_states is not None
        self.is_prefill = True

    def __call__(self, input_ids, model_kwargs):
        if self.transformers5:
            extra = {"is_first_iteration": True} if self.is_prefill else {
                "next_sequence_length": 1 if model_kwargs.get("use_cache", True) else None}
            model_inputs = self.model.prepare_inputs_for_generation(input_ids, **extra, **model_kwargs)
        else:
            if self.is_prefill:  # _update_model_kwargs_for_generation advances it from here
                model_kwargs["cache_position"] = torch.arange(input_ids.shape[1], device=input_ids.device)
            model_inputs = self.model.prepare_inputs_for_generation(input_ids, **model_kwargs)
        if self.output_hidden_states:
            model_inputs["output_hidden_states"] = True
        if self.output_attentions:
            model_inputs["output_attentions"] = True
        self.is_prefill = False
        return self.model(**model_inputs, return_dict=True)


class TokenChoice:
    """How ``_sample`` turns a step's float32 logits into tokens: the logits processors, then argmax
    or a draw, finished rows padded (when a stopping criterion can end rows at EOS), and the
    stopping criteria."""

    def __init__(self, generation_config, logits_processor, stopping_criteria):
        self.do_sample = generation_config.do_sample
        self.logits_processor, self.stopping_criteria = logits_processor, stopping_criteria
        self.pads_finished_rows = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        self.pad_token_id = pad_token_id(generation_config)
        if self.pads_finished_rows and self.pad_token_id is None:
            raise ValueError("stopping at EOS needs a pad_token_id (or an eos_token_id) in the generation config")

    def scores(self, input_ids, logits):
        return self.logits_processor(input_ids, logits)

    def tokens(self, scores, unfinished):
        """``[B]`` next tokens; ``unfinished`` ``[B]`` int64, 0 for finished rows."""
        if self.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if self.pads_finished_rows:
            next_tokens = next_tokens * unfinished + self.pad_token_id * (1 - unfinished)
        return next_tokens


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
