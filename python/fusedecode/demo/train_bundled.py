"""Train the bundled target and draft models on CPU (reproducible; about 4 minutes on 2 cores).

    python -m fusedecode.demo.train_bundled                 # writes python/fusedecode/assets/arithmetic-*
    python -m fusedecode.demo.train_bundled --out DIR --target-steps 200 --draft-steps 100   # quick

Target: Llama architecture, 4 layers, width 128. Draft: 2 layers, width 128, same tokenizer. Both are
trained on freshly drawn problems (never one of the 500 evaluation problems) with the loss on the
answer tokens only, then evaluated greedily on the 500 evaluation problems; the accuracies go into
``training_report.json`` beside the weights (float16 safetensors).

The target's step count is chosen on purpose: this model learns the task abruptly (about 17% greedy
accuracy after 220 steps, 83% after 300, 93% after 360, 99.8% after 450), and a target that is right
most of the time but not always, with visible uncertainty on the digits it gets wrong, is what the
demo, Best-of-N, SRGen and tree speculation need to show anything. The draft stops earlier (about
34% after 320 steps) so that it is the weaker model, as a draft is.
"""

import argparse
import json
import math
import os
import random
import time

import torch

from ..hf import ASSETS
from . import arithmetic

TARGET = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
DRAFT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)


def model_config(tokenizer, shape):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), num_key_value_heads=shape["num_attention_heads"],
                       max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **shape)


def save_tokenizer(tokenizer, path):
    """save_pretrained, with a tokenizer class that transformers 4.5x and 5.x both load."""
    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config.update(tokenizer_class="PreTrainedTokenizerFast", padding_side="left",
                  model_input_names=["input_ids", "attention_mask"])
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2)


def training_batch(tokenizer, rng, batch_size, excluded):
    """Token ids [B, T] (right padded) and labels with -100 outside the answers."""
    ids, labels = [], []
    for _ in range(batch_size):
        while True:
            a, b = arithmetic.make_problem(rng)
            if (a, b) not in excluded:
                break
        prompt = tokenizer(arithmetic.prompt_text(a, b))["input_ids"]
        answer = tokenizer(arithmetic.solution_text(a, b), add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_ids = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    return input_ids, (input_ids != pad).long(), label_ids


def train(model, tokenizer, steps, batch_size, lr, seed, excluded, log_every=100):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    start = time.time()
    for step in range(steps):
        input_ids, attention, labels = training_batch(tokenizer, rng, batch_size, excluded)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    model.eval()
    return time.time() - start


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems, batch_size=100):
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        enc = tokenizer([arithmetic.prompt_text(a, b) for a, b in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=60, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(arithmetic.extract_answer(t) == a + b for t, (a, b) in zip(texts, chunk))
    return correct / len(problems)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=ASSETS)
    parser.add_argument("--target-steps", type=int, default=300)
    parser.add_argument("--draft-steps", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import LlamaForCausalLM

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = arithmetic.build_tokenizer()
    problems = arithmetic.evaluation_problems()
    excluded = set(problems)
    report = {"task": "a+b with 1-4 digit operands, written digit steps", "evaluation_problems": len(problems),
              "torch": torch.__version__}
    for name, shape, steps, lr in (("target", TARGET, args.target_steps, 2e-3),
                                   ("draft", DRAFT, args.draft_steps, 3e-3)):
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(model_config(tokenizer, shape))
        params = sum(p.numel() for p in model.parameters())
        print(f"training {name}: {params / 1e6:.2f}M parameters, {steps} steps", flush=True)
        seconds = train(model, tokenizer, steps, args.batch_size, lr, args.seed + len(name), excluded)
        accuracy = greedy_accuracy(model, tokenizer, problems)
        print(f"{name}: greedy accuracy {accuracy:.3f} on {len(problems)} held-out problems "
              f"({seconds:.0f}s of training)", flush=True)
        path = os.path.join(args.out, f"arithmetic-{name}")
        model.half().save_pretrained(path, safe_serialization=True)
        save_tokenizer(tokenizer, path)
        report[name] = {"parameters": params, "steps": steps, "batch_size": args.batch_size, "lr": lr,
                        "train_seconds": round(seconds, 1), "greedy_accuracy": accuracy, **shape}
    with open(os.path.join(args.out, "training_report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
