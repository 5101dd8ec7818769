"""``tree_speculative``: the ``custom_generate`` entry point of tree speculative decoding.

It refuses what it cannot run exactly, sets up both models' slot caches and the rows' state, runs
``TreeSpeculation.step`` until every row is finished, and assembles ``generate``'s output.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .._custom_generate import (TokenStream, check_config, eos_token_ids, pad_token_id,
                                refuse_unsupported_generation, sampling_temperature)
from ..processors import UncertaintyProcessor
from .config import TreeConfig
from .drafter import Drafter, Drafting
from .slot_cache import SlotCache, check_model
from .step import PendingChain, RowState, TreeSpeculation, Verifier


@dataclass
class TreeSpeculativeOutput(GenerateDecoderOnlyOutput):
    """``generate`` output of ``tree_speculative`` with ``return_dict_in_generate=True``.

    ``num_accepted``: ``[steps, B]`` int64, drafted tokens accepted by each verification (-1 for
    rows already finished). ``mean_accepted_length``: tokens emitted per row per target forward
    (accepted drafts plus the bonus/correction token), over the rows still generating.
    ``past_key_values`` is None: the caches hold per-row holes only this loop understands.
    """

    num_accepted: Optional[torch.LongTensor] = None
    mean_accepted_length: Optional[float] = None


def tree_speculative(model, input_ids, logits_processor, stopping_criteria, generation_config,
                     synced_gpus=False, streamer=None, draft_model=None, tree_config=None, token_streamer=None,
                     **model_kwargs):
    """Tree speculative decoding as a ``custom_generate`` callable for ``model.generate``.

    Greedy output is token-for-token what ``model.generate(do_sample=False)`` gives (up to float
    rounding of batched vs one-token forwards); sampled output has the target's distribution. The
    user's logits processors and stopping criteria apply at every emitted position, as in plain
    decoding. Sliding-window layers get their window in the tree mask. Beam search,
    encoder-decoder models, ALiBi (Bloom, MPT, Falcon with ``alibi=True``), chunked attention,
    recurrent models (Mamba & co.) and attention implementations that ignore a 4D mask (flash
    attention) are refused with a ValueError before any forward.

    Logits processors run on the target's logits of every tree node, drafted nodes that end up
    rejected included, with that node's path as ``input_ids`` and several nodes per call: they must
    be functions of ``(input_ids, scores)`` that keep no history (as most of transformers' are).

    Streaming: transformers does not hand ``streamer=`` to ``custom_generate`` callables (it only
    puts the prompt), so pass ``token_streamer=<a BaseStreamer>`` instead (as with ``srgen``), with a
    batch of one: it gets the prompt, then the accepted tokens after every verification, then
    ``end()``.

    Example::

        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> from fusedecode.hf import TreeConfig, bundled_model_path, tree_speculative
        >>> target = AutoModelForCausalLM.from_pretrained(bundled_model_path("target"))
        >>> draft = AutoModelForCausalLM.from_pretrained(bundled_model_path("draft"))
        >>> tok = AutoTokenizer.from_pretrained(bundled_model_path("target"))
        >>> inputs = tok(["12+34="], return_tensors="pt")
        >>> out = target.generate(**inputs, custom_generate=tree_speculative, draft_model=draft,
        ...                       tree_config=TreeConfig(max_depth=4, top_k=3), max_new_tokens=20,
        ...                       do_sample=False, return_dict_in_generate=True)
        >>> out.mean_accepted_length > 1
        True
    """
    config = check_config("tree_config", tree_config, TreeConfig)
    _check_generation(generation_config, synced_gpus, logits_processor, model_kwargs)
    target_layout, draft_layout = _check_models(model, draft_model, input_ids)
    if token_streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("token_streamer takes one sequence: use a batch of 1 with a streamer")
    # generate never hands over its own ``streamer``; one passed by a direct call gets the new tokens.
    stream = TokenStream(token_streamer, input_ids) if token_streamer is not None else TokenStream(streamer)

    device, batch = input_ids.device, input_ids.shape[0]
    attention_mask = model_kwargs.get("attention_mask")
    prompt_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(device=device, dtype=torch.bool))
    do_sample = bool(generation_config.do_sample)
    drafting = Drafting(config, multi_draft=do_sample and config.sampling == "multi_draft",
                        temperature=sampling_temperature(generation_config),
                        target_vocab=model.get_output_embeddings().weight.shape[0],
                        stop_tokens=eos_token_ids(generation_config))
    drafter = Drafter(SlotCache(draft_model, batch, device, draft_layout), drafting,
                      input_vocab=draft_model.get_input_embeddings().weight.shape[0])
    verifier = Verifier(SlotCache(model, batch, device, target_layout),
                        PendingChain.from_prompt(input_ids, prompt_valid), logits_processor, do_sample)
    rows = [RowState.from_prompt(input_ids[b], prompt_valid[b], config.alpha) for b in range(batch)]
    speculation = TreeSpeculation(rows, config, drafter, verifier, stopping_criteria, stream)
    while not speculation.finished:
        speculation.step()
    stream.end()

    sequences = _sequences(input_ids, [row.emitted for row in rows], pad_token_id(generation_config))
    if not generation_config.return_dict_in_generate:
        return sequences
    return TreeSpeculativeOutput(sequences=sequences,
                                 num_accepted=torch.tensor(speculation.accepted_per_step, dtype=torch.long),
                                 mean_accepted_length=speculation.mean_accepted_length)


def _check_generation(generation_config, synced_gpus, logits_processor, model_kwargs):
    """Refuse, before any forward, the generation settings tree speculation cannot honour."""
    refuse_unsupported_generation("tree_speculative", generation_config, model_kwargs)
    if synced_gpus:
        raise ValueError("tree_speculative does not support synced_gpus")
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise ValueError(f"tree_speculative does not return {flag.replace('output_', '')} "
                             f"({flag}=True); use fusedecode.hf.UncertaintyProcessor with plain generate")
    if any(isinstance(processor, UncertaintyProcessor) for processor in logits_processor):
        raise ValueError("UncertaintyProcessor records one entry per row and step, but under tree_speculative "
                         "processors also run on every drafted node; drop it from logits_processor "
                         "(fusedecode.verify_tree computes the same statistics for every node)")


def _check_models(model, draft_model, input_ids):
    """Refuse, before any forward, models tree speculation cannot run exactly; returns the attention
    layouts of the target and the draft."""
    if draft_model is None:
        raise ValueError("tree_speculative needs draft_model=<a causal LM sharing the target's tokenizer>")
    target_layout = check_model(model, "the target model")
    draft_layout = check_model(draft_model, "draft_model")
    if draft_model.device != input_ids.device:
        raise ValueError(f"draft_model is on {draft_model.device} but the inputs are on {input_ids.device}; "
                         "put both models on the same device")
    return target_layout, draft_layout


def _sequences(input_ids, emitted, pad_token):
    """``[B, prompt + new]``: each row's emitted tokens after its prompt, padded on the right."""
    width = max(len(tokens) for tokens in emitted)
    if any(len(tokens) < width for tokens in emitted) and pad_token is None:
        raise ValueError("rows finished at different lengths and generation_config has no pad_token_id "
                         "(nor eos_token_id) to pad them with")
    fill = pad_token if pad_token is not None else 0
    new = torch.full((input_ids.shape[0], width), fill, dtype=input_ids.dtype, device=input_ids.device)
    for b, tokens in enumerate(emitted):
        new[b, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, new], dim=1)
