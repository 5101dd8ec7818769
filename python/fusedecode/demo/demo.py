"""``python -m fusedecode demo``: per-token uncertainty and self-certainty Best-of-N on the bundled
arithmetic model (or any local checkpoint trained on the same task format).

1. A few problems solved greedily, every generated token coloured by its entropy (green: certain,
   red: uncertain), with each sequence's self-certainty.
2. Best-of-N on held-out problems: N samples per problem; accuracy of a single sample, of the
   majority vote, and of self-certainty Borda voting (Kang et al.).
3. DeepConf online: per problem, warm-up traces calibrate a confidence threshold, then more traces
   are sampled with early stop and the survivors vote, against majority vote at the same budget.
4. SRGen corrective decoding against plain sampling on the same problems and seeds: accuracy,
   corrections made and the entropy they removed.
5. Speculative decoding with the draft model: plain greedy decoding, HF assisted generation and
   fusedecode tree speculation, compared by target forward passes and tokens per forward.

``--html PATH`` writes the same view as a self-contained HTML page.
"""

import argparse
import html
import random
import sys
import time

import torch

from ..confidence import best_of_n, confidence_threshold, deepconf_vote, lowest_group_confidence, majority_vote
from ..hf import (ConfidenceStopping, SRGenConfig, TreeConfig, UncertaintyProcessor, bundled_model_path, srgen,
                  tree_speculative)
from . import arithmetic


def entropy_rgb(entropy, scale):
    """Green (0) -> yellow -> red (>= scale nats)."""
    x = max(0.0, min(1.0, float(entropy) / scale))
    if x < 0.5:
        return int(510 * x), 200, 60
    return 230, int(200 * (1 - 2 * (x - 0.5))), 60


def colour_tokens_ansi(pieces, entropies, scale):
    out = []
    for piece, entropy in zip(pieces, entropies):
        r, g, b = entropy_rgb(entropy, scale)
        out.append(f"\x1b[38;2;{r};{g};{b}m{piece}\x1b[0m")
    return "".join(out)


def colour_tokens_html(pieces, entropies, scale):
    spans = []
    for piece, entropy in zip(pieces, entropies):
        r, g, b = entropy_rgb(entropy, scale)
        spans.append(f'<span title="entropy {float(entropy):.3f}" style="background:rgba({r},{g},{b},0.35)">'
                      f"{html.escape(piece)}</span>")
    return "".join(spans)


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


@torch.no_grad()
def generate_with_uncertainty(model, tokenizer, prompts, **kwargs):
    processor = UncertaintyProcessor(temperature=kwargs.get("temperature", 1.0) if kwargs.get("do_sample") else 1.0)
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, logits_processor=[processor], pad_token_id=tokenizer.pad_token_id, **kwargs)
    return enc["input_ids"].shape[1], out, processor


def show_problems(model, tokenizer, problems, scale, html_parts):
    prompts = [arithmetic.prompt_text(a, b) for a, b in problems]
    start, out, processor = generate_with_uncertainty(model, tokenizer, prompts, max_new_tokens=60, do_sample=False)
    certainty = processor.sequence_self_certainty(out, tokenizer.eos_token_id)
    mask = processor.token_mask(out, tokenizer.eos_token_id)
    print(f"Greedy answers, each token coloured by its entropy (green 0 -> red >= {scale} nats):\n")
    rows = []
    for i, (a, b) in enumerate(problems):
        ids = out[i, start:start + int(mask[i].sum())].tolist()
        pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        entropies = processor.entropy[i, :len(ids)].tolist()
        answer = arithmetic.extract_answer("".join(pieces))
        verdict = "correct" if answer == a + b else f"wrong (expected {a + b})"
        print(f"  {prompts[i]}{colour_tokens_ansi(pieces, entropies, scale)}   "
              f"self-certainty {float(certainty[i]):6.3f}  max entropy {max(entropies):.2f}  {verdict}")
        rows.append(f"<tr><td><code>{html.escape(prompts[i])}{colour_tokens_html(pieces, entropies, scale)}</code>"
                    f"</td><td>{float(certainty[i]):.3f}</td><td>{max(entropies):.2f}</td>"
                    f"<td>{html.escape(verdict)}</td></tr>")
    print()
    html_parts.append("<h2>Greedy answers</h2><p>Each token is coloured by its entropy (green 0 to red "
                      f"&ge; {scale} nats; hover for the value).</p><table><tr><th>problem and answer</th>"
                      "<th>self-certainty</th><th>max entropy</th><th></th></tr>" + "".join(rows) + "</table>")


def best_of_n_table(model, tokenizer, problems, n, temperature, batch_problems, html_parts, seed):
    torch.manual_seed(seed)
    progress = Progress(len(problems), f"Best-of-{n} sampling")
    single = majority = borda = 0.0
    for i in range(0, len(problems), batch_problems):
        chunk = problems[i:i + batch_problems]
        prompts = [arithmetic.prompt_text(a, b) for a, b in chunk]
        start, out, processor = generate_with_uncertainty(
            model, tokenizer, prompts, max_new_tokens=60, do_sample=True, temperature=temperature, top_k=0,
            num_return_sequences=n)
        certainty = processor.sequence_self_certainty(out, tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
        for j, (a, b) in enumerate(chunk):
            answers = [arithmetic.extract_answer(t) for t in texts[j * n:(j + 1) * n]]
            scores = certainty[j * n:(j + 1) * n]
            single += sum(ans == a + b for ans in answers) / n
            majority += best_of_n(scores, answers, power=0.0)[0] == a + b
            borda += best_of_n(scores, answers, power=0.5)[0] == a + b
        progress.update(len(chunk))
    count = len(problems)
    rows = [("single sample (mean over the N samples)", single / count),
            ("majority vote over N", majority / count),
            ("self-certainty Borda voting (power 0.5)", borda / count)]
    print(f"\nAccuracy on {count} held-out problems, N = {n} samples at temperature {temperature}:\n")
    for name, value in rows:
        print(f"  {name:<42} {100 * value:5.1f}%")
    print()
    html_parts.append(f"<h2>Best-of-{n} on {count} held-out problems (temperature {temperature})</h2><table>"
                      + "".join(f"<tr><td>{html.escape(k)}</td><td>{100 * v:.1f}%</td></tr>" for k, v in rows)
                      + "</table>")
    return dict(rows)


class ForwardCounter:
    """Counts forward passes of a model (a pre-hook, so nothing changes in the computation)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


def speculation_table(model, draft, tokenizer, problems, html_parts, config=None):
    """Greedy answers by plain decoding, HF assisted generation and fusedecode tree speculation with
    the same draft: target forward passes, tokens per target forward, and whether the text is the same."""
    config = config or TreeConfig(max_depth=32, top_k=2, max_nodes=64)
    counter = ForwardCounter(model)
    common = dict(max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompts = [arithmetic.prompt_text(a, b) for a, b in problems]
    results = {}
    try:
        for name in ("plain generate", "HF assisted generation", "fusedecode tree speculation"):
            counter.count, texts, tokens, start_time = 0, [], 0, time.time()
            for prompt in prompts:  # batch 1: HF assisted generation supports no other
                enc = tokenizer([prompt], return_tensors="pt")
                extra = {"HF assisted generation": dict(assistant_model=draft),
                         "fusedecode tree speculation": dict(custom_generate=tree_speculative, draft_model=draft,
                                                            tree_config=config)}.get(name, {})
                out = model.generate(**enc, **common, **extra)
                new = out[0, enc["input_ids"].shape[1]:]
                tokens += int((new != tokenizer.pad_token_id).sum())
                texts.append(tokenizer.decode(new, skip_special_tokens=True))
            results[name] = (counter.count, tokens / max(counter.count, 1), texts, time.time() - start_time)
    finally:
        counter.handle.remove()
    plain_texts = results["plain generate"][2]
    print(f"Speculative decoding with the draft, greedy, {len(problems)} problems (batch 1):\n")
    print(f"  {'method':<30} {'target forwards':>15} {'tokens/forward':>15} {'seconds':>8}  same text as plain")
    rows = []
    for name, (forwards, per_forward, texts, seconds) in results.items():
        same = "yes" if texts == plain_texts else "NO"
        print(f"  {name:<30} {forwards:>15} {per_forward:>15.2f} {seconds:>8.2f}  {same}")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{forwards}</td><td>{per_forward:.2f}</td>"
                    f"<td>{seconds:.2f}</td><td>{same}</td></tr>")
    print()
    html_parts.append(f"<h2>Speculative decoding (greedy, {len(problems)} problems, batch 1)</h2><table><tr>"
                      "<th>method</th><th>target forwards</th><th>tokens per forward</th><th>seconds</th>"
                      "<th>same text as plain</th></tr>" + "".join(rows) + "</table>")
    return {name: value[1] for name, value in results.items()}


# The bundled model's step entropies at temperature 0.6 almost never reach the floors of SRGen's
# defaults (std 0.5, thresholds 1.8 and 3.0 nats): with the official trigger rule the defaults make no
# correction in 900 samples (benchmarks/eval_srgen.py), so the demo shows a trigger tuned to it.
DEMO_SRGEN = SRGenConfig(window=10, k=2.0, min_std=0.1, min_threshold=0.3, warmup_threshold=0.3)

# DeepConf on the bundled model: the paper's 16 warm-up traces and top-20 confidence; its 2048-token
# groups are longer than these 20-45-token answers, so groups here are 8 tokens (about one digit step).
DEEPCONF_WARMUP, DEEPCONF_FINAL, DEEPCONF_WINDOW, DEEPCONF_TOPK = 16, 16, 8, 20


def sample_traces(model, tokenizer, problems, count, temperature, stopper=None):
    """``count`` sampled traces per problem (rows grouped by problem): answers, each trace's real-token
    topk_confidence, tokens generated, and which traces ``stopper`` stopped early."""
    enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in problems], return_tensors="pt", padding=True)
    processor = stopper.processor if stopper is not None else UncertaintyProcessor(topk=DEEPCONF_TOPK)
    out = model.generate(**enc, max_new_tokens=60, do_sample=True, temperature=temperature, top_k=0,
                         num_return_sequences=count, pad_token_id=tokenizer.pad_token_id, logits_processor=[processor],
                         stopping_criteria=[stopper] if stopper is not None else None)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    confidences = processor.traces("topk_confidence", out, tokenizer.eos_token_id)
    stopped = stopper.stopped.tolist() if stopper is not None else [False] * len(texts)
    return [arithmetic.extract_answer(t) for t in texts], confidences, sum(map(len, confidences)), stopped


def deepconf_table(model, tokenizer, problems, temperature, html_parts, seed):
    """DeepConf online (Fu et al. 2025) against majority vote (``deepconf_runs``): accuracy, tokens
    generated and traces stopped early, printed and added to ``html_parts``."""
    started = time.time()
    rows = deepconf_runs(model, tokenizer, problems, temperature, seed)
    seconds = time.time() - started
    count, final = len(problems), len(problems) * DEEPCONF_FINAL
    print(f"DeepConf online, {count} problems at temperature {temperature} ({seconds:.1f} s): per problem, "
          f"{DEEPCONF_WARMUP} warm-up traces set the\nthreshold (a percentile of their lowest "
          f"{DEEPCONF_WINDOW}-token group confidence, top-{DEEPCONF_TOPK}); {DEEPCONF_FINAL} more traces stop "
          "early (EOS) below it;\nthe traces at or above it vote, weighted by that confidence:\n")
    print(f"  {'method':<32} {'accuracy':>9} {'tokens generated':>17} {'traces stopped':>15}")
    html_rows = []
    for name, (correct, tokens, stopped) in rows.items():
        stops = f"{stopped}/{final}" if stopped or "DeepConf" in name else "-"
        print(f"  {name:<32} {100 * correct / count:8.1f}% {tokens:>17} {stops:>15}")
        html_rows.append(f"<tr><td>{html.escape(name)}</td><td>{100 * correct / count:.1f}%</td><td>{tokens}</td>"
                         f"<td>{stops}</td></tr>")
    print()
    html_parts.append(f"<h2>DeepConf online ({count} problems, temperature {temperature})</h2><table><tr>"
                      "<th>method</th><th>accuracy</th><th>tokens generated</th><th>traces stopped</th></tr>"
                      + "".join(html_rows) + "</table>")
    return {name: correct / count for name, (correct, _, _) in rows.items()}


def deepconf_runs(model, tokenizer, problems, temperature, seed):
    """DeepConf online per problem: calibrate on warm-up traces (threshold = a percentile of their
    lowest group confidence), sample more traces that stop once their group confidence falls below
    it (the stopping token is EOS), vote among the traces that reach the threshold, weighted by their
    lowest group confidence. Against majority vote over as many plain traces as DeepConf's budget.
    Returns, per method, (problems answered right, tokens generated, traces stopped early)."""
    torch.manual_seed(seed)
    warm_answers, warm_confidences, warm_tokens, _ = sample_traces(model, tokenizer, problems, DEEPCONF_WARMUP,
                                                                   temperature)
    warm_lowest = [lowest_group_confidence(c, DEEPCONF_WINDOW) for c in warm_confidences]

    def per_problem(values, size):
        return [values[i * size:(i + 1) * size] for i in range(len(problems))]

    rows = {}
    plain_answers, _, plain_tokens, _ = sample_traces(model, tokenizer, problems, DEEPCONF_FINAL, temperature)
    correct = sum(majority_vote(w + f)[0] == a + b for w, f, (a, b) in
                  zip(per_problem(warm_answers, DEEPCONF_WARMUP), per_problem(plain_answers, DEEPCONF_FINAL), problems))
    rows[f"majority vote, {DEEPCONF_WARMUP + DEEPCONF_FINAL} traces"] = (correct, warm_tokens + plain_tokens, 0)
    for name, keep in (("DeepConf-low (keep top 10%)", 10), ("DeepConf-high (keep top 90%)", 90)):
        thresholds = [confidence_threshold(group, keep_percent=keep)
                      for group in per_problem(warm_lowest, DEEPCONF_WARMUP)]
        stopper = ConfidenceStopping(window=DEEPCONF_WINDOW, threshold=torch.tensor(thresholds).repeat_interleave(
            DEEPCONF_FINAL), topk=DEEPCONF_TOPK, eos_token_id=tokenizer.eos_token_id)
        answers, confidences, tokens, stopped = sample_traces(model, tokenizer, problems, DEEPCONF_FINAL, temperature,
                                                              stopper)
        lowest = [lowest_group_confidence(c, DEEPCONF_WINDOW) for c in confidences]
        correct = 0
        for i, (a, b) in enumerate(problems):
            votes = (per_problem(warm_answers, DEEPCONF_WARMUP)[i] + per_problem(answers, DEEPCONF_FINAL)[i],
                     per_problem(warm_lowest, DEEPCONF_WARMUP)[i] + per_problem(lowest, DEEPCONF_FINAL)[i])
            correct += deepconf_vote(*votes, thresholds[i])[0] == a + b
        rows[name] = (correct, warm_tokens + tokens, sum(stopped))
    return rows


def srgen_table(model, tokenizer, problems, html_parts, temperature=0.6, batch_problems=100, seed=0):
    """Sampling accuracy with and without SRGen corrections on the same problems and seeds, with the
    number of corrections and the entropy they removed."""
    results = {}
    for name, config in (("plain sampling", None), ("SRGen (trigger tuned to this model)", DEMO_SRGEN)):
        correct, corrections, entropy_drop, start_time = 0, 0, 0.0, time.time()
        for i in range(0, len(problems), batch_problems):
            chunk = problems[i:i + batch_problems]
            enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in chunk], return_tensors="pt", padding=True)
            torch.manual_seed(seed + i)
            kwargs = dict(max_new_tokens=60, do_sample=True, temperature=temperature, top_k=0,
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
    print(f"SRGen corrective decoding, {len(problems)} problems at temperature {temperature} "
          f"(trigger: window {DEMO_SRGEN.window}, k {DEMO_SRGEN.k}, floor {DEMO_SRGEN.min_threshold}):\n")
    print(f"  {'method':<38} {'accuracy':>9} {'corrections':>12} {'mean entropy drop':>18} {'seconds':>8}")
    rows = []
    for name, (accuracy, count, drop, seconds) in results.items():
        print(f"  {name:<38} {100 * accuracy:8.1f}% {count:>12} {drop:>18.3f} {seconds:>8.2f}")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{100 * accuracy:.1f}%</td><td>{count}</td>"
                    f"<td>{drop:.3f}</td><td>{seconds:.2f}</td></tr>")
    print()
    html_parts.append(f"<h2>SRGen ({len(problems)} problems, temperature {temperature})</h2><table><tr>"
                      "<th>method</th><th>accuracy</th><th>corrections</th><th>mean entropy drop</th>"
                      "<th>seconds</th></tr>" + "".join(rows) + "</table>")
    return results


def write_html(path, parts, title):
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
            "table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}"
            "code{font-size:1.05em}</style></head><body><h1>" + html.escape(title) + "</h1>" + "".join(parts)
            + "</body></html>")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fusedecode demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local checkpoint (default: the bundled target)")
    parser.add_argument("--draft", default=None, help="draft checkpoint for speculative decoding "
                        "(default: the bundled draft with the bundled target, none with --model)")
    parser.add_argument("--speculate", type=int, default=10, help="problems decoded speculatively (0: skip)")
    parser.add_argument("--srgen", type=int, default=100, help="problems for the SRGen comparison (0: skip)")
    parser.add_argument("--deepconf", type=int, default=16, help="problems for DeepConf online (0: skip)")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems for Best-of-N")
    parser.add_argument("--n", type=int, default=8, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--show", type=int, default=6, help="problems shown token by token")
    parser.add_argument("--scale", type=float, default=1.0, help="entropy (nats) shown fully red")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--html", default=None, help="also write the view to this HTML file")
    args = parser.parse_args(argv)

    path = args.model or bundled_model_path("target")
    model, tokenizer = load(path)
    print(f"fusedecode demo: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)\n")
    problems = arithmetic.evaluation_problems(args.problems + args.show + args.deepconf)
    shown = random.Random(args.seed).sample(problems[args.problems:args.problems + args.show], args.show)
    parts = []
    if shown:
        show_problems(model, tokenizer, shown, args.scale, parts)
    best_of_n_table(model, tokenizer, problems[:args.problems], args.n, args.temperature, 25, parts, args.seed)
    if args.deepconf > 0:
        deepconf_table(model, tokenizer, problems[args.problems + args.show:], args.temperature, parts, args.seed)
    if args.srgen > 0:
        srgen_table(model, tokenizer, problems[:args.srgen], parts, seed=args.seed)
    draft_path = args.draft or (bundled_model_path("draft") if args.model is None else None)
    if draft_path and args.speculate > 0:
        draft, _ = load(draft_path)
        speculation_table(model, draft, tokenizer, problems[:args.speculate], parts)
    if args.html:
        write_html(args.html, parts, "fusedecode demo")
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
