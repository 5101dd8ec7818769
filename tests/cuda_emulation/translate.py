"""The emulator's source translation: the two constructs of CUDA C++ that are not C++.

- ``kernel<<<grid, block[, shared[, stream]]>>>(args...)`` becomes
  ``::fdemu::launch_kernel(site, "kernel", kernel, grid, block, shared, stream, args...)``;
- ``__shared__ T name[...];`` becomes ``static T name[...]; FDEMU_SHARED_DECLARED(name);`` (one
  variable per block: blocks run one at a time; the runtime poisons it when a block first reaches
  it, see runtime/fdemu/runtime.h).

Everything else is left as it is (comments and string literals are never rewritten), and the line
numbers stay those of the source, which a ``#line`` directive names, so compiler messages and the
emulator's reports point at the original file. Usage: ``translate.py SOURCE OUTPUT [DISPLAY_NAME]``.
"""

import re
import sys

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TranslationError(ValueError):
    pass


def _mask_comments_and_literals(text):
    """``text`` with comments, string and character literals blanked (same length, newlines kept),
    so that searches see only code."""
    out = list(text)
    i, n = 0, len(text)

    def blank(start, stop):
        for k in range(start, stop):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if text.startswith("//", i):
            stop = text.find("\n", i)
            stop = n if stop < 0 else stop
            blank(i, stop)
            i = stop
        elif text.startswith("/*", i):
            stop = text.find("*/", i + 2)
            stop = n if stop < 0 else stop + 2
            blank(i, stop)
            i = stop
        elif text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            open_paren = text.find("(", i)
            delimiter = text[i + 2:open_paren]
            stop = text.find(")" + delimiter + '"', open_paren)
            stop = n if stop < 0 else stop + len(delimiter) + 2
            blank(i + 1, stop)
            i = stop
        elif text[i] in "\"'":
            quote = text[i]
            k = i + 1
            while k < n and text[k] != quote:
                k += 2 if text[k] == "\\" else 1
            blank(i + 1, k)
            i = k + 1
        else:
            i += 1
    return "".join(out)


def _matching(code, start, opening, closing):
    """Index of the bracket closing the one at ``start`` (``code[start] == opening``)."""
    depth = 0
    for k in range(start, len(code)):
        if code[k] == opening:
            depth += 1
        elif code[k] == closing:
            depth -= 1
            if depth == 0:
                return k
    raise TranslationError(f"unbalanced {opening!r} at offset {start}")


def _split_top_level(text):
    """Split at the commas outside (), [] and {}."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    tail = "".join(current).strip()
    if tail or parts:
        parts.append(tail)
    return parts


def _kernel_start(code, end):
    """Start of the kernel expression that ends right before ``end`` (a name, with ``::`` and
    template arguments)."""
    k = end
    while k > 0 and code[k - 1].isspace():
        k -= 1
    while k > 0:
        if code[k - 1] == ">":
            depth = 0
            j = k - 1
            while j >= 0:
                if code[j] == ">":
                    depth += 1
                elif code[j] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                j -= 1
            if j < 0:
                raise TranslationError("unbalanced template arguments before <<<")
            k = j
        elif code[k - 1].isalnum() or code[k - 1] == "_":
            while k > 0 and (code[k - 1].isalnum() or code[k - 1] == "_"):
                k -= 1
        elif code[k - 2:k] == "::":
            k -= 2
        else:
            break
    return k


def _line_breaks(text):
    return "\n" * text.count("\n")


def _rewrite_launches(text):
    code = _mask_comments_and_literals(text)
    pieces, position = [], 0
    for match in re.finditer(r"<<<", code):
        if match.start() < position:
            continue
        begin = _kernel_start(code, match.start())
        kernel = " ".join(text[begin:match.start()].split())
        if not kernel:
            raise TranslationError(f"no kernel name before <<< at offset {match.start()}")
        config_end = code.find(">>>", match.end())
        if config_end < 0:
            raise TranslationError(f"<<< without >>> at offset {match.start()}")
        config = _split_top_level(text[match.end():config_end])
        if not 2 <= len(config) <= 4:
            raise TranslationError(f"launch of {kernel} needs 2 to 4 configuration values, got {config}")
        config += ["0", "nullptr"][len(config) - 2:]
        k = config_end + 3
        while code[k].isspace():
            k += 1
        if code[k] != "(":
            raise TranslationError(f"launch of {kernel}: expected '(' after >>>")
        close = _matching(code, k, "(", ")")
        args = text[k + 1:close].strip()
        call = (f'::fdemu::launch_kernel(::fdemu::Site{{__FILE__, __LINE__}}, "{kernel}", {kernel}, '
                f"{', '.join(config)}{', ' + ' '.join(args.split()) if args else ''})")
        pieces += [text[position:begin], call, _line_breaks(text[begin:close + 1])]
        position = close + 1
    pieces.append(text[position:])
    return "".join(pieces)


def _rewrite_shared(text):
    code = _mask_comments_and_literals(text)
    pieces, position = [], 0
    for match in re.finditer(r"\b__shared__\b", code):
        end = code.find(";", match.end())
        declaration = text[match.end():end]
        body = " ".join(declaration.split())
        before = code[max(0, match.start() - 16):match.start()]
        if re.search(r"\bextern\s*$", before):
            raise TranslationError(f"extern __shared__ (dynamic shared memory) is not emulated: {body}")
        if "=" in body or "," in re.sub(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)", "", body):
            raise TranslationError(f"__shared__ declaration with an initializer or several names: {body}")
        bracket = body.find("[")
        head = body if bracket < 0 else body[:bracket]
        names = _IDENTIFIER.findall(head)
        if len(names) < 2:
            raise TranslationError(f"cannot find the type and name of __shared__ {body}")
        name = names[-1]
        replacement = f"static {body}; FDEMU_SHARED_DECLARED({name});"
        pieces += [text[position:match.start()], replacement, _line_breaks(text[match.start():end + 1])]
        position = end + 1
    pieces.append(text[position:])
    return "".join(pieces)


def translate(text, display_name):
    """The emulator's version of one CUDA source file."""
    body = _rewrite_shared(_rewrite_launches(text))
    return f'#line 1 "{display_name}"\n{body}'


def main(argv):
    if len(argv) not in (3, 4):
        raise SystemExit(__doc__)
    source, output = argv[1], argv[2]
    display = argv[3] if len(argv) == 4 else source
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(translate(text, display))


if __name__ == "__main__":
    main(sys.argv)
