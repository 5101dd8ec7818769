"""How the demo shows its results: one ``Section`` per experiment, rendered to the terminal and to a
self-contained HTML page from the same text, so the page keeps every explanation the terminal prints.

A section has a title, paragraphs (set-up and how to read it), an optional table (header row and
rows), optional plots (inline SVG, drawn here: no plotting dependency) and notes (a word where a
number looks surprising). Tokens coloured by entropy are the one piece with two renderings
(``ColouredText``).
"""

import html
import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence


def entropy_rgb(entropy, scale):
    """Green (0) -> yellow -> red (>= scale nats)."""
    x = max(0.0, min(1.0, float(entropy) / scale))
    if x < 0.5:
        return int(510 * x), 200, 60
    return 230, int(200 * (1 - 2 * (x - 0.5))), 60


@dataclass
class ColouredText:
    """A prompt followed by generated pieces, each coloured by its entropy."""

    prompt: str
    pieces: Sequence[str]
    entropies: Sequence[float]
    scale: float

    def terminal(self):
        out = [self.prompt]
        for piece, entropy in zip(self.pieces, self.entropies):
            r, g, b = entropy_rgb(entropy, self.scale)
            out.append(f"\x1b[38;2;{r};{g};{b}m{piece}\x1b[0m")
        return "".join(out)

    def html(self):
        spans = []
        for piece, entropy in zip(self.pieces, self.entropies):
            r, g, b = entropy_rgb(entropy, self.scale)
            spans.append(f'<span title="entropy {float(entropy):.3f}" style="background:rgba({r},{g},{b},0.35)">'
                         f"{_text(piece)}</span>")
        return f"<code>{_text(self.prompt)}{''.join(spans)}</code>"

    def __len__(self):  # terminal width: escapes take no room
        return len(self.prompt) + sum(len(piece) for piece in self.pieces)


def _width(value):
    return len(value) if isinstance(value, ColouredText) else len(str(value))


def _looks_numeric(value):
    """Right-aligned in the terminal: numbers, percentages, ratios ("1.23x"), counts ("3/48"), "-"."""
    text = str(value).strip().rstrip("%x")
    return not isinstance(value, ColouredText) and (text == "-" or text.replace("/", "").replace(".", "", 1)
                                                    .lstrip("+-").isdigit())


def _cell_terminal(value):
    return value.terminal() if isinstance(value, ColouredText) else str(value)


def _text(value):
    """Element content (not an attribute): quotes stay as they are."""
    return html.escape(str(value), quote=False)


def _cell_html(value):
    return value.html() if isinstance(value, ColouredText) else _text(value)


@dataclass
class Table:
    header: Sequence[str]
    rows: List[Sequence[object]]

    def terminal(self, indent="  "):
        columns = list(zip(*self.rows)) if self.rows else [()] * len(self.header)
        widths = [max([len(str(h))] + [_width(c) for c in column]) for h, column in zip(self.header, columns)]
        numeric = [bool(column) and all(_looks_numeric(c) for c in column) for column in columns]
        lines = []
        for row in [self.header] + list(self.rows):
            cells = []
            for cell, width, right in zip(row, widths, numeric):
                pad = " " * (width - _width(cell))
                cells.append(pad + _cell_terminal(cell) if right else _cell_terminal(cell) + pad)
            lines.append(indent + "  ".join(cells).rstrip())
        lines.insert(1, indent + "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def html(self):
        head = "".join(f"<th>{_text(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Section:
    title: str
    paragraphs: List[str] = field(default_factory=list)
    table: Optional[Table] = None
    notes: List[str] = field(default_factory=list)
    plots: List[str] = field(default_factory=list)  # SVG markup (HTML only; the terminal has the numbers)

    def terminal(self):
        parts = [f"{self.title}\n{'=' * len(self.title)}"]
        parts += [_wrap(p) for p in self.paragraphs]
        if self.table is not None:
            parts.append(self.table.terminal())
        parts += [_wrap("Note: " + n) for n in self.notes]
        if self.plots:
            parts.append(f"({len(self.plots)} plot{'s' if len(self.plots) > 1 else ''} in the HTML page: --html PATH)")
        return "\n\n".join(parts) + "\n"

    def html(self):
        parts = [f"<h2>{_text(self.title)}</h2>"]
        parts += [f"<p>{_text(p)}</p>" for p in self.paragraphs]
        if self.table is not None:
            parts.append(self.table.html())
        parts += [f'<div class="plot">{svg}</div>' for svg in self.plots]
        parts += [f'<p class="note"><b>Note.</b> {_text(n)}</p>' for n in self.notes]
        return "<section>" + "".join(parts) + "</section>"


def _wrap(text, width=100):
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(lines + [line])


PAGE_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}"
              "table{border-collapse:collapse;margin:.5em 0}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;"
              "text-align:left;vertical-align:top}th{background:#f3f3f3}code{font-size:1.05em}"
              "section{margin-bottom:2.2em}.note{background:#fff8e0;padding:.5em .8em;border-left:3px solid #e0b000}"
              ".plot{display:inline-block;margin:.5em 1em .5em 0}")


def write_html(path, title, sections):
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            + PAGE_STYLE + "</style></head><body><h1>" + html.escape(title) + "</h1>"
            + "".join(section.html() for section in sections) + "</body></html>")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)


# ------------------------------------------------------------------------------------------------
# Plots: a line chart as inline SVG

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _ticks(low, high, count=5):
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= step * m)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(index * step, 10) for index in range(first, max(last, first + 1) + 1)]


def line_plot(title, x_label, y_label, series, width=520, height=300, y_range=None, integer_x=False):
    """An SVG line chart. ``series``: ``[(name, [(x, y), ...], dashed)]``, drawn with markers."""
    left, right, top = 56, 16, 30
    legend = _legend_layout([name for name, _, _ in series], left, width - right)
    bottom = 48 + 16 * (1 + max((row for _, _, row in legend), default=0))
    points = [p for _, values, _ in series for p in values if math.isfinite(p[1])]
    xs, ys = [p[0] for p in points] or [0, 1], [p[1] for p in points] or [0, 1]
    x_ticks = sorted(set(int(x) for x in xs)) if integer_x and len(set(xs)) <= 12 else _ticks(min(xs), max(xs))
    y_ticks = _ticks(*(y_range or (min(ys), max(ys))))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for y in y_ticks:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in x_ticks:
        out.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}" stroke="#444"/>'
               f'<line x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}" stroke="#444"/>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - bottom + 32}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    out.append(f'<text transform="translate(14,{(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(y_label)}</text>')
    for index, (name, values, dashed) in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        finite = [(x, y) for x, y in values if math.isfinite(y)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{path}"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in finite]
    for index, ((name, _, dashed), (_, x, row)) in enumerate(zip(series, legend)):
        legend_y = height - bottom + 48 + 16 * row
        colour = COLOURS[index % len(COLOURS)]
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        out.append(f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/><text x="{x + 22:.1f}" y="{legend_y}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _legend_layout(names, left, right, char_width=6.5):
    """``(name, x, row)`` of each legend entry: left to right, wrapping to a new row at ``right``
    (text width estimated from its length at 11 px)."""
    placed, x, row = [], left, 0
    for name in names:
        width = 22 + char_width * len(name) + 18
        if x > left and x + width > right:
            x, row = left, row + 1
        placed.append((name, x, row))
        x += width
    return placed
