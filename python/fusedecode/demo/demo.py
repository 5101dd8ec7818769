"""``python -m fusedecode demo``: what fusedecode buys, measured on the bundled arithmetic target and
draft (or any local checkpoint trained on the same task format).

1. Set-up: the two models' sizes and the cost of one forward of each, the machine, the thread count.
2. A few problems solved greedily, every generated token coloured by its entropy, with each
   answer's self-certainty; a plot of the entropy over each answer.
3. Best-of-N on held-out problems: N samples per problem; accuracy of a single sample, of majority
   vote, of self-certainty Borda voting (Kang et al.) and of Borda voting on each sample's
   log-likelihood (re-scored after generation by ``fusedecode.hf.score``); a plot of accuracy
   against the number of samples.
4. DeepConf online: per problem, warm-up traces calibrate a confidence threshold, then more traces
   are sampled with early stop and the survivors vote, against majority vote at the same budget.
5. SRGen corrective decoding with the paper's defaults and with a trigger tuned to this model,
   against plain sampling on the same problems and seeds.
6. Speculative decoding with the draft: plain greedy decoding, HF assisted generation and fusedecode
   tree speculation, by target forward passes and wall time (same greedy text).

The terminal shows each part as it finishes and ends with a side-by-side summary of what each
method buys; ``--html PATH`` writes the same text, tables and the plots as one self-contained page
that leads with that summary. Torch runs on one thread (``DEMO_THREADS``; the set-up section says why).
"""

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time

import torch

from ..confidence import best_of_n, confidence_threshold, deepconf_vote, lowest_group_confidence, majority_vote
from ..hf import (ConfidenceStopping, SRGenConfig, TreeConfig, UncertaintyProcessor, bundled_model_path, score, srgen,
                  tree_speculative)
from . import arithmetic
from .report import ColouredText, Section, Table, line_plot, write_html

# One thread, whatever the machine: torch's CPU attention kernel (scaled_dot_product_attention) rounds
# the last bits of a batch row differently depending on how the batch is split over threads, and
# DeepConf's stop rule compares confidences with a threshold they can equal exactly (a final trace
# identical to a warm-up trace), so with 2 threads its rows changed; every other result, and
# logit_stats itself, were bit-identical. One thread is also the fast choice on a shared machine.
DEMO_THREADS = 1

# The bundled model's step entropies at temperature 0.6 almost never reach the floors of SRGen's
# defaults (std 0.5, thresholds 1.8 and 3.0 nats), so the demo also runs a trigger tuned to it.
DEMO_SRGEN = SRGenConfig(window=10, k=2.0, min_std=0.1, min_threshold=0.3, warmup_threshold=0.3)
SRGEN_TEMPERATURE = 0.6

# DeepConf on the bundled model: the paper's 16 warm-up traces and top-20 confidence; its 2048-token
# groups are longer than these 20-45-token answers, so groups here are 8 tokens (about one digit step).
DEEPCONF_WARMUP, DEEPCONF_FINAL, DEEPCONF_WINDOW, DEEPCONF_TOPK = 16, 16, 8, 20

DEMO_TREE = TreeConfig(max_depth=32, top_k=2, max_nodes=32, min_prob=0.05)
MAX_NEW_TOKENS = 60


class Progress:
    """A small text progress bar on stderr (no dependency)."""

    def __init__(self, total, label):
        self.total, self.label, self.done, self.start = total, label, 0, time.time()

    def update(self, amount):
        self.done += amount
        width = 30
        filled = int(width * self.done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{time.time() - self.start:5.1f}s")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def load(path):
    """A model and its tokenizer; the weights (stored in float16 for the bundled pair) run in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


class ForwardCounter:
    """Counts forward passes of a model (a pre-hook, so nothing changes in the computation)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


def percent(value):
    return f"{100 * value:.1f}%"


def standard_error_points(accuracy, count):
    """The binomial standard error of an accuracy measured on ``count`` problems, in points (with
    the accuracy kept half a problem away from 0 and 1, where the plain formula says 0)."""
    count = max(count, 1)
    accuracy = min(max(accuracy, 0.5 / count), 1 - 0.5 / count)
    return 100 * math.sqrt(accuracy * (1 - accuracy) / count)


# ------------------------------------------------------------------------------------------------
# 1. Set-up


def describe_model(model):
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    return (f"{params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers of width {config.hidden_size}",
            params)


@torch.no_grad()
def forward_ms(models, repeats=30):
    """Milliseconds of one forward of one new token after 30 cached ones (decoding's step) for each
    model: the median CPU time of ``repeats`` runs, the models interleaved (CPU time, which other
    processes on a shared machine inflate far less than wall time; torch runs on one thread)."""
    from transformers import DynamicCache

    times = [[] for _ in models]
    for round_ in range(repeats + 5):  # the first rounds warm up (allocator, caches) and are not counted
        for model, spent in zip(models, times if round_ >= 5 else [[] for _ in models]):
            prefix = torch.randint(3, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
            cache = DynamicCache()
            model(input_ids=prefix, past_key_values=cache, use_cache=True)
            start = time.process_time()
            model(input_ids=prefix[:, -1:], past_key_values=cache, use_cache=True)
            spent.append(time.process_time() - start)
    return [1e3 * statistics.median(spent) for spent in times]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return (math.nan,) * 3


def setup_section(target_path, target, draft_path, draft):
    import transformers

    target_text, _ = describe_model(target)
    stored = getattr(target.config, "dtype", None) or getattr(target.config, "torch_dtype", None) or torch.float32
    paragraphs = [f"Target: {target_path} ({target_text}). Stored in {str(stored).replace('torch.', '')}, run in "
                  "float32 (upcast at load). The task: a+b with 1-4 digit operands, the answer written digit step "
                  "by digit step, then the sum after '|'."]
    costs = None
    if draft is not None:
        draft_text, _ = describe_model(draft)
        costs = forward_ms([target, draft])
        paragraphs.append(f"Draft: {draft_path} ({draft_text}), same tokenizer. One forward (one new token after "
                          f"30 cached; median CPU time of 30 interleaved runs): target {costs[0]:.2f} ms, draft "
                          f"{costs[1]:.2f} ms, so a draft forward costs {100 * costs[1] / costs[0]:.0f}% of a target "
                          "forward, as in real deployments, where drafting many tokens per target forward pays off.")
    load1, load5, load15 = load_average()
    paragraphs.append(f"Machine: {cpu_name()}, {os.cpu_count()} cores; {platform.system()}, Python "
                      f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
                      f"load average {load1:.1f} / {load5:.1f} / {load15:.1f} (1 / 5 / 15 min) at the start. Wall "
                      "times depend on it; accuracies, token counts and forward counts do not.")
    paragraphs.append(f"Threads: torch runs on {DEMO_THREADS} thread, pinned by the demo, so every number but the "
                      "wall times is the same on any machine with this torch build. Why: torch's CPU attention kernel "
                      "(scaled_dot_product_attention) rounds the last bits of a batch row differently depending on how "
                      "the batch is split over threads, and DeepConf's stop rule compares trace confidences with a "
                      "threshold they can equal exactly (a final trace identical to a warm-up trace), so with 2 "
                      "threads DeepConf's rows changed (every other row, and logit_stats itself, were bit-identical). "
                      "One thread is also the fast choice on a shared machine: with other jobs running, two threads "
                      "were several times slower.")
    return Section("Set-up", paragraphs), costs


# ------------------------------------------------------------------------------------------------
# 2. Greedy answers coloured by entropy


@torch.no_grad()
def generate_with_uncertainty(model, tokenizer, prompts, **kwargs):
    processor = UncertaintyProcessor(temperature=kwargs.get("temperature", 1.0) if kwargs.get("do_sample") else 1.0)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, logits_processor=[processor], pad_token_id=tokenizer.pad_token_id, **kwargs)
    return enc["input_ids"].shape[1], out, processor


def greedy_section(model, tokenizer, problems, scale):
    prompts = [arithmetic.prompt_text(a, b) for a, b in problems]
    start, out, processor = generate_with_uncertainty(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                                      do_sample=False)
    certainty = processor.sequence_self_certainty(out, tokenizer.eos_token_id)
    mask = processor.token_mask(out, tokenizer.eos_token_id)
    rows, series, record = [], [], []
    for i, (a, b) in enumerate(problems):
        ids = out[i, start:start + int(mask[i].sum())].tolist()
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        entropies = processor.entropy[i, :len(ids)].tolist()
        correct = arithmetic.extract_answer("".join(pieces)) == a + b
        verdict = "correct" if correct else f"wrong (expected {a + b})"
        rows.append((ColouredText(prompts[i], pieces, entropies, scale), f"{float(certainty[i]):.3f}",
                     f"{max(entropies):.2f}", verdict))
        record.append(dict(problem=prompts[i], answer="".join(pieces), correct=correct,
                           self_certainty=float(certainty[i])))
        series.append((f"{a}+{b} {'right' if correct else 'WRONG'}", list(enumerate(entropies)), not correct))
    plot = line_plot("Entropy over each greedy answer", "answer token", "entropy (nats)", series, width=640)
    return Section("Greedy answers, each token coloured by its entropy", [
        f"Each generated token is coloured by the entropy of the distribution it was drawn from (green 0 to red >= "
        f"{scale} nats; in the page, hover a token for its value), recorded by fusedecode.hf.UncertaintyProcessor "
        "during generate with no [B, V] history. Self-certainty is the answer's mean KL(uniform || p): higher means "
        "more confident. The hard tokens are the digit sums and carries; copying digits is easy."],
        Table(("problem and answer", "self-certainty", "max entropy", "verdict"), rows), plots=[plot]), record


# ------------------------------------------------------------------------------------------------
# 3. Best-of-N


@torch.no_grad()
def rescore(model, tokenizer, prompts, n, out, start, processor, temperature):
    """Each sampled completion re-scored after generation in one teacher-forced pass
    (``fusedecode.hf.score``): ``(mean self-certainty, mean token log-probability)`` over its real
    tokens (up to and including the first EOS), ``[B]`` each. The log-probabilities of the tokens
    actually drawn are what the online processor cannot see (it runs before sampling)."""
    prompt_mask = tokenizer(prompts, return_tensors="pt", padding=True)["attention_mask"].repeat_interleave(n, 0)
    generated = processor.token_mask(out, tokenizer.eos_token_id).long()
    stats = score(model, out, torch.cat([prompt_mask, generated], 1), temperature=temperature)
    # Entry t is the distribution over token t + 1: the completion's tokens from entry start - 1 on;
    # entries over padding (after EOS) are NaN.
    means = []
    for values in (stats.self_certainty[:, start - 1:], stats.token_logprob[:, start - 1:]):
        real = ~torch.isnan(values)
        means.append(torch.where(real, values, torch.zeros(())).sum(1) / real.sum(1))
    return tuple(means)


def sample_best_of_n(model, tokenizer, problems, n, temperature, batch_problems, seed):
    """Per problem: the N answers, their online self-certainties and re-scored log-likelihoods; the
    tokens generated; the largest gap between online and re-scored self-certainty."""
    torch.manual_seed(seed)
    progress = Progress(len(problems), f"Best-of-{n} sampling")
    per_problem, tokens, largest_gap = [], 0, 0.0
    for i in range(0, len(problems), batch_problems):
        chunk = problems[i:i + batch_problems]
        prompts = [arithmetic.prompt_text(a, b) for a, b in chunk]
        start, out, processor = generate_with_uncertainty(
            model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=temperature,
            top_k=0, num_return_sequences=n)
        certainty = processor.sequence_self_certainty(out, tokenizer.eos_token_id)
        tokens += int(processor.token_mask(out, tokenizer.eos_token_id).sum())
        rescored, log_likelihood = rescore(model, tokenizer, prompts, n, out, start, processor, temperature)
        largest_gap = max(largest_gap, float((rescored - certainty).abs().nan_to_num(0.0).max()))
        texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
        for j, (a, b) in enumerate(chunk):
            rows = slice(j * n, (j + 1) * n)
            per_problem.append(dict(truth=a + b, answers=[arithmetic.extract_answer(t) for t in texts[rows]],
                                    certainty=certainty[rows].tolist(), likelihood=log_likelihood[rows].tolist()))
        progress.update(len(chunk))
    return per_problem, tokens, largest_gap


def best_of_n_accuracies(per_problem, n):
    """Accuracy of each way to pick one answer from the first ``n`` samples of every problem."""
    def rate(pick):
        return sum(pick(p) == p["truth"] for p in per_problem) / len(per_problem)

    return {
        "single sample (mean over the N samples)":
            sum(sum(a == p["truth"] for a in p["answers"][:n]) / n for p in per_problem) / len(per_problem),
        "majority vote over N": rate(lambda p: best_of_n(p["certainty"][:n], p["answers"][:n], power=0.0)[0]),
        "self-certainty Borda voting (power 0.5)":
            rate(lambda p: best_of_n(p["certainty"][:n], p["answers"][:n], power=0.5)[0]),
        "re-scored (hf.score): log-likelihood Borda":
            rate(lambda p: best_of_n(p["likelihood"][:n], p["answers"][:n], power=0.5)[0]),
    }


def best_of_n_section(model, tokenizer, problems, n, temperature, seed):
    per_problem, tokens, largest_gap = sample_best_of_n(model, tokenizer, problems, n, temperature, 25, seed)
    results = best_of_n_accuracies(per_problem, n)
    by_samples = {k: best_of_n_accuracies(per_problem, k) for k in range(1, n + 1)}
    curves = {name: [(k, 100 * by_samples[k][name]) for k in by_samples] for name in results}
    rows = [(name, percent(value), tokens) for name, value in results.items()]
    plot = line_plot(f"Accuracy against samples per problem ({len(problems)} problems)", "samples per problem (N)",
                     "accuracy (%)", [(name.split(" (")[0], points, name.startswith("single"))
                                      for name, points in curves.items()], width=640,
                     y_range=(max(0, 10 * math.floor(min(y for points in curves.values() for _, y in points) / 10) - 10),
                              100), integer_x=True)
    section = Section(f"Best-of-{n} on {len(problems)} held-out problems (temperature {temperature})", [
        f"{n} samples per problem; every way of picking an answer uses the same samples, so the same "
        f"{tokens} generated tokens. Self-certainty is recorded online during sampling (no extra pass). "
        f"Re-scoring the samples offline (fusedecode.hf.score, one teacher-forced pass, no [T, V] logits) "
        f"reproduces the online self-certainty to {largest_gap:.1e}; it also sees the log-probability of each "
        "drawn token, which the last row votes with. The plot picks from the first N samples of each problem."],
        Table(("method", "accuracy", "tokens generated"), rows), plots=[plot])
    return section, results, tokens, curves


# ------------------------------------------------------------------------------------------------
# 4. DeepConf online


def sample_traces(model, tokenizer, problems, count, temperature, stopper=None):
    """``count`` sampled traces per problem (rows grouped by problem): answers, each trace's real-token
    topk_confidence, tokens generated, and which traces ``stopper`` stopped early."""
    enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems], return_tensors="pt", padding=True)
    processor = stopper.processor if stopper is not None else UncertaintyProcessor(topk=DEEPCONF_TOPK)
    out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=temperature, top_k=0,
                         num_return_sequences=count, pad_token_id=tokenizer.pad_token_id, logits_processor=[processor],
                         stopping_criteria=[stopper] if stopper is not None else None)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    confidences = processor.traces("topk_confidence", out, tokenizer.eos_token_id)
    stopped = stopper.stopped.tolist() if stopper is not None else [False] * len(texts)
    return [arithmetic.extract_answer(t) for t in texts], confidences, sum(map(len, confidences)), stopped


def deepconf_runs(model, tokenizer, problems, temperature, seed):
    """DeepConf online per problem: calibrate on warm-up traces (threshold = a percentile of their
    lowest group confidence), sample more traces that stop once their group confidence falls below
    it (the stopping token is EOS), vote among the traces that reach the threshold, weighted by their
    lowest group confidence. Against majority vote over as many plain traces as DeepConf's budget.
    Returns, per method, a dict: problems answered right (``correct``, and ``right`` per problem),
    ``tokens`` generated, final traces ``stopped`` early, voting traces per problem (``voters``)."""
    torch.manual_seed(seed)
    warm_answers, warm_confidences, warm_tokens, _ = sample_traces(model, tokenizer, problems, DEEPCONF_WARMUP,
                                                                   temperature)
    warm_lowest = [lowest_group_confidence(c, DEEPCONF_WINDOW) for c in warm_confidences]

    def per_problem(values, size):
        return [values[i * size:(i + 1) * size] for i in range(len(problems))]

    rows = {}
    plain_answers, _, plain_tokens, _ = sample_traces(model, tokenizer, problems, DEEPCONF_FINAL, temperature)
    right = [majority_vote(w + f)[0] == a + b for w, f, (a, b) in
             zip(per_problem(warm_answers, DEEPCONF_WARMUP), per_problem(plain_answers, DEEPCONF_FINAL), problems)]
    total = DEEPCONF_WARMUP + DEEPCONF_FINAL
    rows[f"majority vote, {total} traces"] = dict(correct=sum(right), right=right, tokens=warm_tokens + plain_tokens,
                                                  stopped=0, voters=[total] * len(problems))
    for name, keep in (("DeepConf-low (keep top 10%)", 10), ("DeepConf-high (keep top 90%)", 90)):
        thresholds = [confidence_threshold(group, keep_percent=keep)
                      for group in per_problem(warm_lowest, DEEPCONF_WARMUP)]
        # float64, as deepconf_vote compares: a float32 tensor would round the threshold, and a trace
        # exactly at it (identical traces tie) would then be stopped and yet vote.
        per_row = torch.tensor(thresholds, dtype=torch.float64).repeat_interleave(DEEPCONF_FINAL)
        stopper = ConfidenceStopping(window=DEEPCONF_WINDOW, threshold=per_row, topk=DEEPCONF_TOPK,
                                     eos_token_id=tokenizer.eos_token_id)
        answers, confidences, tokens, stopped = sample_traces(model, tokenizer, problems, DEEPCONF_FINAL, temperature,
                                                              stopper)
        lowest = [lowest_group_confidence(c, DEEPCONF_WINDOW) for c in confidences]
        right, voters = [], []
        for i, (a, b) in enumerate(problems):
            votes = (per_problem(warm_answers, DEEPCONF_WARMUP)[i] + per_problem(answers, DEEPCONF_FINAL)[i],
                     per_problem(warm_lowest, DEEPCONF_WARMUP)[i] + per_problem(lowest, DEEPCONF_FINAL)[i])
            right.append(deepconf_vote(*votes, thresholds[i])[0] == a + b)
            voters.append(sum(confidence >= thresholds[i] for confidence in votes[1]))
        rows[name] = dict(correct=sum(right), right=right, tokens=warm_tokens + tokens, stopped=sum(stopped),
                          voters=voters)
    return rows


def deepconf_section(model, tokenizer, problems, temperature, seed):
    started = time.time()
    rows = deepconf_runs(model, tokenizer, problems, temperature, seed)
    seconds = time.time() - started
    count, final = len(problems), len(problems) * DEEPCONF_FINAL
    majority = next(iter(rows.values()))
    table = []
    for name, row in rows.items():
        stops = f"{row['stopped']}/{final}" if "DeepConf" in name else "-"
        table.append((name, percent(row["correct"] / count), row["tokens"],
                      f"{100 * (1 - row['tokens'] / majority['tokens']):.0f}%", stops,
                      f"{sum(row['voters']) / count:.1f}"))
    notes = []
    for name, row in list(rows.items())[1:]:
        drop = 100 * (majority["correct"] - row["correct"]) / count
        if drop < 2 * standard_error_points(majority["correct"] / count, count):
            continue
        lost = [i for i in range(count) if majority["right"][i] and not row["right"][i]]
        voters = sum(row["voters"][i] for i in lost) / max(len(lost), 1)
        notes.append(f"{name.split(' (')[0]} is {drop:.0f} points below majority vote. Only the traces whose lowest "
                     f"group confidence reaches the {100 - (10 if 'low' in name else 90)}th percentile of the "
                     f"{DEEPCONF_WARMUP} warm-up traces vote: on the {len(lost)} problem(s) it loses, {voters:.1f} "
                     "traces voted on average, and the most confident traces there carried a wrong answer (the model "
                     "is confidently wrong on them, while most of its traces are right). On easy problems many traces "
                     "are identical and tie at the threshold, hence the higher average of voters. DeepConf-low is "
                     "meant for hundreds of traces per problem (the paper samples 512), where the top 10% are still "
                     "many.")
    notes.append(f"{count} problems: one problem is {100 / count:.1f} points, and the standard error of these "
                 f"accuracies is about {standard_error_points(majority['correct'] / count, count):.0f} points.")
    return Section(f"DeepConf online ({count} problems, temperature {temperature}, {seconds:.1f} s)", [
        f"Per problem, {DEEPCONF_WARMUP} warm-up traces set the threshold: a percentile of their lowest "
        f"{DEEPCONF_WINDOW}-token group confidence (DeepConf's top-{DEEPCONF_TOPK} token confidence; the paper's "
        f"2048-token groups are longer than these answers). {DEEPCONF_FINAL} more traces stop early (EOS) once their "
        "group confidence falls below it (fusedecode.hf.ConfidenceStopping); the traces at or above it vote, "
        f"weighted by that confidence. Majority vote uses {DEEPCONF_WARMUP + DEEPCONF_FINAL} full traces: the same "
        "number of traces, with no early stop."],
        Table(("method", "accuracy", "tokens generated", "tokens saved", "traces stopped", "voters per problem"),
              table), notes=notes), rows


# ------------------------------------------------------------------------------------------------
# 5. SRGen


@torch.no_grad()
def plain_step_entropies(model, tokenizer, problems, seed, batch_problems):
    """The highest entropy of any sampled step at SRGen's temperature (what its trigger compares)."""
    highest = 0.0
    for i in range(0, len(problems), batch_problems):
        prompts = [arithmetic.prompt_text(a, b) for a, b in problems[i:i + batch_problems]]
        torch.manual_seed(seed + i)
        _, out, processor = generate_with_uncertainty(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS,
                                                      do_sample=True, temperature=SRGEN_TEMPERATURE, top_k=0)
        mask = processor.token_mask(out, tokenizer.eos_token_id)
        highest = max(highest, float(processor.entropy[:, :mask.shape[1]][mask].max()))
    return highest


def srgen_runs(model, tokenizer, problems, seed, batch_problems=100):
    """Accuracy, corrections, mean entropy drop and seconds of plain sampling and of SRGen with the
    paper's defaults and with the tuned trigger, on the same problems and seeds."""
    results = {}
    for name, config in (("plain sampling", None), ("SRGen, the paper's defaults", SRGenConfig()),
                         ("SRGen, trigger tuned to this model", DEMO_SRGEN)):
        correct, corrections, entropy_drop, start_time = 0, 0, 0.0, time.time()
        for i in range(0, len(problems), batch_problems):
            chunk = problems[i:i + batch_problems]
            enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in chunk], return_tensors="pt", padding=True)
            torch.manual_seed(seed + i)
            kwargs = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=SRGEN_TEMPERATURE, top_k=0,
                          pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
            if config is not None:
                kwargs.update(custom_generate=srgen, srgen_config=config)
            out = model.generate(**enc, **kwargs)
            texts = tokenizer.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, chunk))
            for row in getattr(out, "corrections", None) or []:
                corrections += len(row)
                entropy_drop += sum(before - after for _, before, after in row)
        results[name] = (correct / len(problems), corrections, entropy_drop / max(corrections, 1),
                         time.time() - start_time)
    return results


def srgen_section(model, tokenizer, problems, seed):
    results = srgen_runs(model, tokenizer, problems, seed)
    count = len(problems)
    defaults, tuned = SRGenConfig(), DEMO_SRGEN
    rows = [(name, percent(accuracy), corrections, f"{drop:.3f}" if corrections else "-", f"{seconds:.1f}")
            for name, (accuracy, corrections, drop, seconds) in results.items()]
    plain_accuracy = results["plain sampling"][0]
    default_corrections = results["SRGen, the paper's defaults"][1]
    tuned_accuracy, tuned_corrections = results["SRGen, trigger tuned to this model"][:2]
    notes = []
    if default_corrections == 0:
        highest = plain_step_entropies(model, tokenizer, problems, seed, 100)
        notes.append(f"The paper's defaults never fired here: the highest step entropy while sampling these "
                     f"problems was {highest:.2f} nats, below their floors (warm-up threshold "
                     f"{defaults.warmup_threshold} nats, then at least {defaults.min_threshold} nats). "
                     "They were set for large models' long reasoning traces; this small model is rarely that unsure, "
                     "so the tuned trigger is what makes SRGen act on it.")
    difference = 100 * (tuned_accuracy - plain_accuracy)
    error = standard_error_points(plain_accuracy, count)
    if tuned_corrections and abs(difference) < 2 * error:
        points = "point" if round(abs(difference)) == 1 else "points"
        notes.append(f"SRGen with the tuned trigger changes accuracy by {difference:+.0f} {points} "
                     f"({round(abs(difference) * count / 100)} of {count} problems, one sample each): within sampling "
                     f"noise (the standard error is about {error:.0f} points). Its corrections do lower the entropy of "
                     "the steps they touch; whether that buys accuracy needs more problems, or a harder task.")
    return Section(f"SRGen corrective decoding ({count} problems, temperature {SRGEN_TEMPERATURE}, same seeds)", [
        "Per row, SRGen compares each step's entropy with a threshold over the previous window of step "
        "entropies, max(mean + k * max(std, min_std), min_threshold), or the warm-up threshold until the window "
        "is full; above it, it optimises a correction added to the final hidden state for a few AdamW steps "
        "(cross-entropy over the context plus the step's entropy, through fusedecode's fused lm_head pass) and "
        "emits the token from the corrected logits.",
        f"The paper's defaults: window {defaults.window}, k {defaults.k}, min_std {defaults.min_std}, floor "
        f"{defaults.min_threshold} nats, warm-up threshold {defaults.warmup_threshold} nats. The tuned trigger: "
        f"window {tuned.window}, k {tuned.k}, min_std {tuned.min_std}, floor {tuned.min_threshold}, warm-up "
        f"{tuned.warmup_threshold}."],
        Table(("method", "accuracy", "corrections", "mean entropy drop (nats)", "seconds"), rows), notes=notes), results


# ------------------------------------------------------------------------------------------------
# 6. Speculative decoding


def greedy_runs(model, draft, tokenizer, prompts, config):
    """One pass of each method over ``prompts`` (batch 1: HF assisted generation supports no other):
    per method (target forwards, new tokens, texts, seconds)."""
    counter = ForwardCounter(model)
    common = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    methods = {"plain greedy": {}, "HF assisted generation": dict(assistant_model=draft),
               "fusedecode tree speculation": dict(custom_generate=tree_speculative, draft_model=draft,
                                                   tree_config=config)}
    results = {}
    try:
        for name, extra in methods.items():
            counter.count, texts, tokens, start = 0, [], 0, time.perf_counter()
            for prompt in prompts:
                enc = tokenizer([prompt], return_tensors="pt")
                out = model.generate(**enc, **common, **extra)
                new = out[0, enc["input_ids"].shape[1]:]
                tokens += int((new != tokenizer.pad_token_id).sum())
                texts.append(tokenizer.decode(new, skip_special_tokens=True))
            results[name] = (counter.count, tokens, texts, time.perf_counter() - start)
    finally:
        counter.handle.remove()
    return results


def speculation_section(model, draft, tokenizer, problems, repeats, config=DEMO_TREE):
    prompts = [arithmetic.prompt_text(a, b) for a, b in problems]
    greedy_runs(model, draft, tokenizer, prompts[:1], config)  # warm-up (first-call allocations)
    before = load_average()[0]
    runs = [greedy_runs(model, draft, tokenizer, prompts, config) for _ in range(repeats)]
    after = load_average()[0]
    first = runs[0]
    seconds = {name: statistics.median(run[name][3] for run in runs) for name in first}
    plain_texts, plain_seconds = first["plain greedy"][2], seconds["plain greedy"]
    same = {name: all(run[name][2] == plain_texts for run in runs) for name in first}
    rows = []
    for name, (forwards, tokens, _, _) in first.items():
        rows.append((name, forwards, f"{tokens / max(forwards, 1):.2f}", f"{seconds[name]:.2f}",
                     f"{plain_seconds / seconds[name]:.2f}x", "yes" if same[name] else "NO"))
    tree, assisted = seconds["fusedecode tree speculation"], seconds["HF assisted generation"]
    section = Section(f"Speculative decoding with the draft (greedy, {len(problems)} problems, batch 1)", [
        f"Greedy decoding of the target three ways: plain, HF assisted generation (a chain drafted by the draft "
        f"model, its default schedule) and fusedecode tree speculation (TreeConfig(max_depth={config.max_depth}, "
        f"top_k={config.top_k}, max_nodes={config.max_nodes}, min_prob={config.min_prob}): the draft grows a token "
        "tree, the target scores it in one tree-masked forward, verify_tree walks it). All three must give the same "
        "text. Target forwards "
        "are counted with a hook; tokens per forward is what a forward of the target buys.",
        f"Wall time: the median of {repeats} interleaved runs on one thread; load average {before:.1f} before and "
        f"{after:.1f} after. Tree speculation took {tree:.2f} s against {plain_seconds:.2f} s plain "
        f"({plain_seconds / tree:.2f}x) and {assisted:.2f} s for HF assisted generation ({assisted / tree:.2f}x)."],
        Table(("method", "target forwards", "tokens per forward", "seconds", "speed-up vs plain",
               "same text as plain"), rows))
    return section, dict(forwards={name: run[0] for name, run in first.items()},
                         tokens={name: run[1] for name, run in first.items()}, seconds=seconds, same=same)


# ------------------------------------------------------------------------------------------------
# The summary that leads the page


def summary_section(best, deepconf, srgen_results, speculation, costs):
    rows = []
    if best is not None:
        results, tokens, n = best
        rows.append((f"self-certainty Best-of-{n}", f"majority vote over the same {n} samples",
                     f"accuracy {percent(results['self-certainty Borda voting (power 0.5)'])} vs "
                     f"{percent(results['majority vote over N'])} (one sample: "
                     f"{percent(results['single sample (mean over the N samples)'])})",
                     f"none: the same {tokens} tokens; self-certainty is recorded while sampling"))
    if deepconf is not None:
        rows_by_name, count = deepconf
        majority_name, majority = next(iter(rows_by_name.items()))
        for name, row in list(rows_by_name.items())[1:]:
            rows.append((name.split(" (")[0], majority_name,
                         f"accuracy {percent(row['correct'] / count)} vs {percent(majority['correct'] / count)}; "
                         f"{100 * (1 - row['tokens'] / majority['tokens']):.0f}% fewer tokens ({row['tokens']} vs "
                         f"{majority['tokens']})", "a threshold per problem from its warm-up traces"))
    if speculation is not None:
        forwards, seconds, same = speculation["forwards"], speculation["seconds"], speculation["same"]
        tree, plain, assisted = "fusedecode tree speculation", "plain greedy", "HF assisted generation"
        rows.append(("tree speculation", "plain greedy; HF assisted generation",
                     f"target forwards {forwards[tree]} vs {forwards[plain]} and {forwards[assisted]}; wall time "
                     f"{seconds[tree]:.2f} s vs {seconds[plain]:.2f} s ({seconds[plain] / seconds[tree]:.2f}x) and "
                     f"{seconds[assisted]:.2f} s ({seconds[assisted] / seconds[tree]:.2f}x); same text: "
                     f"{'yes' if same[tree] else 'NO'}",
                     f"draft forwards, each {100 * costs[1] / costs[0]:.0f}% of a target forward" if costs else
                     "draft forwards"))
    if srgen_results is not None:
        plain, _, _, plain_seconds = srgen_results["plain sampling"]
        default_accuracy, default_corrections, _, _ = srgen_results["SRGen, the paper's defaults"]
        tuned, corrections, drop, seconds = srgen_results["SRGen, trigger tuned to this model"]
        rows.append(("SRGen, the paper's defaults", "plain sampling, same seeds",
                     f"{default_corrections} corrections" + (" (never fired)" if default_corrections == 0 else "")
                     + f"; accuracy {percent(default_accuracy)} vs {percent(plain)}", "-"))
        rows.append(("SRGen, tuned trigger", "plain sampling, same seeds",
                     f"accuracy {percent(tuned)} vs {percent(plain)}; {corrections} corrections, each lowering the "
                     f"step's entropy by {drop:.2f} nats on average",
                     f"{seconds:.1f} s vs {plain_seconds:.1f} s"))
    return Section("What each method buys, side by side", [
        "Each row is measured below on the same model and problems; accuracies, token and forward counts are the "
        "same on any machine (one thread), wall times are this machine's."],
        Table(("method", "against", "what it buys here", "what it costs"), rows))


# ------------------------------------------------------------------------------------------------
# Entry point


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedecode demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local checkpoint (default: the bundled target)")
    parser.add_argument("--draft", default=None, help="draft checkpoint for speculative decoding "
                        "(default: the bundled draft with the bundled target, none with --model)")
    parser.add_argument("--speculate", type=int, default=10, help="problems decoded speculatively (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each speculation method (median)")
    parser.add_argument("--srgen", type=int, default=100, help="problems for the SRGen comparison (0: skip)")
    parser.add_argument("--deepconf", type=int, default=16, help="problems for DeepConf online (0: skip)")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems for Best-of-N (0: skip)")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--show", type=int, default=6, help="problems shown token by token")
    parser.add_argument("--scale", type=float, default=1.0, help="entropy (nats) shown fully red")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", default=None, help="also write the view to this HTML file")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (wall times "
                        "under the keys 'seconds' and 'forward_ms')")
    args = parser.parse_args(argv)

    torch.set_num_threads(DEMO_THREADS)
    target_path = args.model or bundled_model_path("target")
    draft_path = args.draft or (bundled_model_path("draft") if args.model is None else None)
    model, tokenizer = load(target_path)
    draft = load(draft_path)[0] if draft_path and args.speculate > 0 else None
    # Best-of-N, the shown problems and DeepConf take disjoint problems; SRGen and speculation reuse the first ones.
    problems = arithmetic.evaluation_problems(max(args.problems + args.show + args.deepconf, args.srgen, args.speculate))
    shown = random.Random(args.seed).sample(problems[args.problems:args.problems + args.show], args.show)

    sections = []

    def show(section):
        print(section.terminal(), flush=True)
        sections.append(section)

    setup, costs = setup_section(target_path, model, draft_path, draft)
    show(setup)
    record = dict(torch_threads=torch.get_num_threads(), forward_ms=costs)
    best = deepconf = srgen_results = speculation = None
    if shown:
        section, record["greedy"] = greedy_section(model, tokenizer, shown, args.scale)
        show(section)
    if args.problems > 0:
        section, results, tokens, curves = best_of_n_section(model, tokenizer, problems[:args.problems], args.n,
                                                             args.temperature, args.seed)
        show(section)
        best = (results, tokens, args.n)
        record["best_of_n"] = dict(accuracy=results, tokens=tokens, accuracy_by_samples=curves)
    if args.deepconf > 0:
        section, rows = deepconf_section(model, tokenizer, problems[args.problems + args.show:], args.temperature,
                                         args.seed)
        show(section)
        deepconf = (rows, args.deepconf)
        record["deepconf"] = rows
    if args.srgen > 0:
        section, srgen_results = srgen_section(model, tokenizer, problems[:args.srgen], args.seed)
        show(section)
        record["srgen"] = {name: dict(zip(("accuracy", "corrections", "mean_entropy_drop", "seconds"), values))
                           for name, values in srgen_results.items()}
    if draft is not None:
        section, speculation = speculation_section(model, draft, tokenizer, problems[:args.speculate], args.repeats)
        show(section)
        record["speculation"] = speculation
    summary = summary_section(best, deepconf, srgen_results, speculation, costs)
    print(summary.terminal(), flush=True)
    if args.html:
        write_html(args.html, "fusedecode demo: what each method buys", [summary] + sections)
        print(f"wrote {args.html}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
