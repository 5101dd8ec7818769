"""``fusedecode.hf.score``: per-token statistics of given sequences under teacher forcing, without
ever holding their ``[B, T, V]`` logits.

One forward pass of the model computes only the last position's logits (``logits_to_keep=1``, which
also checks the head's reconstruction); a hook on the decoder keeps the final hidden states
(``FinalHiddenCapture``, not ``output_hidden_states``, which would keep every layer's), and
``fusedecode.linear_logit_stats`` turns them into statistics tile by tile through the model's own
head (``read_output_head``: lm_head weight, bias, logit scale, soft-cap). What it knows of the model
(head, hidden states, ``logits_to_keep``) is ``fusedecode.hf.models``. Offline self-certainty
Best-of-N, DeepConf offline confidence, perplexity and prompt uncertainty are the uses.
"""

import inspect

import torch

from .._validation import INDEX_DTYPES, check_int, check_tensor, check_temperature
from ..ops.linear_logit_stats import linear_logit_stats
from ..ops.logit_stats import MAX_TOPK, LogitStats
from .models.forward import logits_to_keep_keyword
from .models.head import check_head, read_output_head
from .models.hidden import FinalHiddenCapture

__all__ = ["score"]


def score(model, input_ids, attention_mask=None, *, temperature=1.0, topk=0, max_tokens_per_chunk=None):
    """``logit_stats`` of a causal LM's next-token distribution at every position of ``input_ids``.

    Entry ``t`` of each field (``[B, T - 1]``) is the distribution over token ``t + 1`` given tokens
    ``<= t``, divided by ``temperature``: ``token_logprob`` is the log-probability of the actual
    token ``t + 1`` (its negation summed is the sequence's negative log-likelihood), ``entropy``,
    ``self_certainty``, ``topk_confidence`` (with ``topk``) are those the model had when choosing it.
    These are the numbers an ``UncertaintyProcessor`` records during ``generate`` for the generated
    tokens (at the same temperature, before any sampling warper), computed afterwards in one pass.

    The model's own head is used: ``get_output_embeddings()`` with its bias, and the logit scale or
    soft-cap its config declares (Cohere, Granite, Gemma 2/3, ...); a model whose logits are something
    else raises ``ValueError`` (checked on the last position's logits, the only ones its forward
    computes here).

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask=...)`` gives ``.logits``).
        input_ids: int ``[B, T]`` token ids, T >= 1.
        attention_mask: optional ``[B, T]`` of 0/1 (as the tokenizer returns it; left or right padding):
            positions with 0 are padding. Positions are counted over real tokens only, as ``generate``
            does.
        temperature: float > 0 dividing the logits.
        topk: 0 (off) or 1..64: DeepConf's ``topk_confidence``.
        max_tokens_per_chunk: positions whose logits are computed at a time (``linear_logit_stats``'s
            ``chunk``); default keeps them around 48 MiB in float32.

    Returns:
        ``LogitStats`` of ``[B, T - 1]`` float32 tensors (``argmax`` int64) with ``token_logprob``
        (and ``topk_confidence`` when ``topk > 0``), on the model's device. Entries where token ``t``
        or token ``t + 1`` is padding are NaN (``argmax`` -1): there is no token to score there, or
        no context to score it in.

    Example::

        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import bundled_model_path, score
        >>> path = bundled_model_path("target")
        >>> model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        >>> batch = tokenizer(["12+34=46", "5+5=10"], return_tensors="pt", padding=True)
        >>> stats = score(model, **batch)
        >>> stats.token_logprob.shape == (2, batch["input_ids"].shape[1] - 1)
        True
    """
    _check_score_args(input_ids, attention_mask, temperature, topk, max_tokens_per_chunk)
    head = read_output_head(model, user="score")
    hidden, last_logits = _final_hidden(model, input_ids, attention_mask)
    check_head(last_logits.float(), hidden[:, -1], head, user="score")
    scored = input_ids[:, 1:]
    valid = None
    if attention_mask is not None:
        real = attention_mask.to(torch.bool)
        valid = real[:, 1:] & real[:, :-1]
        scored = torch.where(valid, scored, torch.zeros_like(scored))  # padding ids may be out of range
    with torch.no_grad():
        stats = linear_logit_stats(hidden[:, :-1].to(head.weight.dtype), head.weight, bias=head.transform.bias,
                                   logit_scale=head.transform.logit_scale, softcap=head.transform.softcap,
                                   temperature=temperature, token_ids=scored, topk=topk, chunk=max_tokens_per_chunk)
    return _mask_padding(stats, valid)


def _check_score_args(input_ids, attention_mask, temperature, topk, max_tokens_per_chunk):
    check_tensor("input_ids", input_ids, INDEX_DTYPES, dims=(2,))
    if input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, INDEX_DTYPES + (torch.bool,), shape=input_ids.shape,
                     device=input_ids.device, device_of="input_ids")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens)")
    check_temperature(temperature)
    check_int("topk", topk, 0, MAX_TOPK)
    if max_tokens_per_chunk is not None:
        check_int("max_tokens_per_chunk", max_tokens_per_chunk, 1, 2**31 - 1)


def _final_hidden(model, input_ids, attention_mask):
    """``(final hidden states [B, T, H], the last position's logits [B, V])`` of one forward pass
    that computes no other logits where the model allows it."""
    parameters = inspect.signature(model.forward).parameters
    keep = logits_to_keep_keyword(model)
    extra = {keep: 1} if keep is not None else {}
    if attention_mask is not None:
        extra["attention_mask"] = attention_mask
        if "position_ids" in parameters:
            # As generate counts positions: over real tokens only (left padding shifts nothing).
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), FinalHiddenCapture(model, user="score") as capture:
        output = model(input_ids=input_ids, use_cache=False, **extra)
        hidden = capture.take()
    return hidden, output.logits[:, -1]


def _mask_padding(stats, valid):
    """NaN (argmax -1) in every entry whose ``valid`` is false."""
    if valid is None:
        return stats
    fields = {}
    for name, value in stats._asdict().items():
        if value is None:
            fields[name] = None
        elif name == "argmax":
            fields[name] = value.masked_fill(~valid, -1)
        else:
            fields[name] = value.masked_fill(~valid, float("nan"))
    return LogitStats(**fields)
