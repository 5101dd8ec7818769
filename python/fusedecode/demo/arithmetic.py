"""The synthetic task of the bundled models: multi-digit addition with written intermediate steps.

A problem is ``a+b=`` with 1-4 digit operands. The answer writes one step per digit, from the least
significant, with the carry from the step before, then the result after ``|``::

    47+385=7+5+0=12;4+8+1=13;0+3+1=4|432

Copying digits and the step format are easy tokens; the digit sums, the carries and the final
reassembly are hard ones, which is what entropy-based methods and tree speculation need.
The tokenizer is character level and saved as a Hugging Face ``tokenizer.json``.
"""

import random

CHARACTERS = list("0123456789+=;|")
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
MAX_DIGITS = 4


def make_problem(rng, max_digits=MAX_DIGITS):
    """(a, b) with independently drawn digit counts in 1..max_digits."""
    def operand():
        digits = rng.randint(1, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)

    return operand(), operand()


def prompt_text(a, b):
    return f"{a}+{b}="


def solution_text(a, b):
    """The worked answer after ``=``: digit steps, then ``|`` and the sum."""
    steps, carry = [], 0
    for position in range(max(len(str(a)), len(str(b)))):
        da, db = (a // 10 ** position) % 10, (b // 10 ** position) % 10
        total = da + db + carry
        steps.append(f"{da}+{db}+{carry}={total}")
        carry = total // 10
    return ";".join(steps) + f"|{a + b}"


def extract_answer(text):
    """The integer after the last ``|`` (generated text may include the prompt), or None."""
    if "|" not in text:
        return None
    tail = text.rsplit("|", 1)[1]
    digits = ""
    for ch in tail:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def evaluation_problems(count=500, seed=20261127):
    """A fixed set of distinct problems; training never samples these."""
    rng = random.Random(seed)
    problems = []
    seen = set()
    while len(problems) < count:
        problem = make_problem(rng)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (BOS prepended, no spaces when decoding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, BOS, EOS] + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=PAD, model_input_names=["input_ids", "attention_mask"])
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return tokenizer
