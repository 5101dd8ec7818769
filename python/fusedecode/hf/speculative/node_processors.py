"""The generate loop's logits processors, run at every node of the draft trees as plain decoding
would have run them there."""

import copy

import torch


def processes_positions(logits_processor):
    """Whether some processor's output depends on the token ids (then each tree node needs its own
    path as input_ids); pure warpers (temperature, top-k/p, ...) only look at the scores."""
    from transformers import generation as hf_generation

    pure = tuple(getattr(hf_generation, name) for name in (
        "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
        "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper") if hasattr(hf_generation, name))
    return any(not isinstance(processor, pure) for processor in logits_processor)


def process_tree_logits(logits_processor, logits, row_ids, pruned_trees):
    """Run the generate loop's logits processors on every tree node's logits ``[B, N, V]``, as plain
    decoding would have at that node: input_ids = the row's committed ids + the node's drafted path
    (``pruned_trees[b]``: row b's ``PrunedTree``)."""
    if len(logits_processor) == 0:
        return logits
    batch, nodes, vocab = logits.shape
    if not processes_positions(logits_processor) and len({len(ids) for ids in row_ids}) == 1:
        # Only pure warpers: one call over every node, with any ids of the right length.
        ids = torch.stack(row_ids)[:, None, :].expand(batch, nodes, -1).reshape(batch * nodes, -1)
        return logits_processor(ids, logits.reshape(batch * nodes, vocab)).view(batch, nodes, vocab)
    processed = logits.clone()
    for b, pruned in enumerate(pruned_trees):
        by_depth = {}
        for node, depth in enumerate(pruned.depths):
            by_depth.setdefault(depth, []).append(node)
        for depth, members in by_depth.items():  # one call per depth: the ids have one length
            paths = [pruned.drafted_tokens(node) for node in members]
            suffix = torch.tensor(paths, dtype=row_ids[b].dtype, device=logits.device).view(len(members), depth)
            ids = torch.cat([row_ids[b][None, :].expand(len(members), -1), suffix], dim=1)
            index = torch.tensor(members, device=logits.device)
            processed[b, index] = as_row(logits_processor, b, len(members))(ids, logits[b, index])
    return processed


def as_row(logits_processor, row, count):
    """The processors as they would act on batch row ``row`` of plain decoding, for a call with
    ``count`` nodes of that row. Two of transformers' processors keep per-row state: the repetition
    penalty's ``prompt_ignore_length`` (each prompt's padding, a ``[B]`` tensor since 5.2x) and the
    batch id that ``prefix_allowed_tokens_fn`` is called with."""
    from transformers import generation as hf_generation

    viewed = []
    for processor in logits_processor:
        ignored = getattr(processor, "prompt_ignore_length", None)
        if isinstance(processor, hf_generation.RepetitionPenaltyLogitsProcessor) and isinstance(ignored, torch.Tensor):
            processor = copy.copy(processor)
            processor.prompt_ignore_length = ignored[row].expand(count)
        elif isinstance(processor, hf_generation.PrefixConstrainedLogitsProcessor):
            allowed_tokens, processor = processor._prefix_allowed_tokens_fn, copy.copy(processor)
            processor._prefix_allowed_tokens_fn = lambda batch_id, ids: allowed_tokens(row, ids)
        viewed.append(processor)
    return type(logits_processor)(viewed)
