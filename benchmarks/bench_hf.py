"""Time per generate step with and without UncertaintyProcessor, and against output_scores=True with
the same statistics computed afterwards from the kept [B, V] scores.

    python benchmarks/bench_hf.py                        # bundled model on CPU
    python benchmarks/bench_hf.py --qwen2-0.5b --device cuda   # Qwen2-0.5B-shaped random weights

Greedy decoding of a fixed number of tokens (no EOS stop), batch sizes 1 and 16, median of repeats.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from fusedecode import logit_stats
from fusedecode.hf import UncertaintyProcessor, bundled_model_path


def qwen2_05b_random(device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model, vocab, device, batch, prompt_len, new_tokens, repeats):
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    base = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def plain():
        model.generate(**base)

    def with_processor():
        model.generate(**base, logits_processor=[UncertaintyProcessor()])

    def with_scores():
        out = model.generate(**base, output_scores=True, return_dict_in_generate=True)
        for scores in out.scores:  # what one would do without the processor
            logit_stats(scores, backend="torch")

    plain()  # warm-up
    results = {name: timed(fn, device, repeats) / new_tokens
               for name, fn in (("plain", plain), ("processor", with_processor), ("output_scores+stats", with_scores))}
    results["processor_overhead_pct"] = 100 * (results["processor"] / results["plain"] - 1)
    results["output_scores_overhead_pct"] = 100 * (results["output_scores+stats"] / results["plain"] - 1)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--qwen2-0.5b", dest="qwen", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.qwen:
        model, vocab, name = qwen2_05b_random(args.device), 151936, "Qwen2-0.5B-shaped (random weights)"
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(bundled_model_path("target")).float().to(args.device).eval()
        vocab, name = model.config.vocab_size, "bundled arithmetic target"
    rows = []
    for batch in args.batch:
        r = measure(model, vocab, args.device, batch, 16, args.new_tokens, args.repeats)
        rows.append({"batch": batch, **r})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{name} on {args.device}, ms per generated token (greedy, {args.new_tokens} tokens):\n")
    print("| batch | plain | + UncertaintyProcessor | output_scores + stats | processor overhead | "
          "output_scores overhead |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['plain'] * 1e3:.2f} | {r['processor'] * 1e3:.2f} | "
              f"{r['output_scores+stats'] * 1e3:.2f} | {r['processor_overhead_pct']:+.1f}% | "
              f"{r['output_scores_overhead_pct']:+.1f}% |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": name, "device": args.device, "results": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
