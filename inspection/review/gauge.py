"""The score scale on a part's page: pass / review / reject zones, both thresholds and the part's score as SVG.

Calibrated thresholds sit near 0 (review 0.007, reject 0.019) while defect scores sit near 1 (0.992), so a
linear 0..1 bar crowds both thresholds into its left edge. The axis is log-odds (logit): equal steps from 0.001
to 0.01 to 0.1 to 0.5 and mirrored up to 0.999, so every one of those values has room. Labels are laid out on a
line with their widths estimated on the wide side (DejaVu Sans metrics) and pushed apart where they would
touch; a label moved off its tick gets a leader line. The SVG scales as a whole, so labels that do not overlap
in its own units do not overlap on any screen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH = 360  # viewBox units; the SVG is drawn at the panel's width
HEIGHT = 84
PAD = 6  # labels keep this far from the SVG's edges
BAR_LEFT, BAR_RIGHT = 14, WIDTH - 14  # leaves room for the end ticks' labels
BAR_Y, BAR_H = 24, 14
SCORE_Y = 12  # baseline of the score label, above its marker
LABEL_Y = BAR_Y + BAR_H + 20  # baseline of the threshold labels
AXIS_Y = HEIGHT - 4  # baseline of the axis tick labels
LABEL_SIZE, AXIS_SIZE = 12, 10
GAP = 6  # least space between two labels
P_MIN, P_MAX = 1e-4, 1 - 1e-4  # the axis never reaches further: 0 and 1 have no log-odds
DEFAULT_RANGE = (1e-3, 1 - 1e-3)  # at least this much of the axis is shown
AXIS_TICKS = (1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
ZONE_COLOURS = {"pass": "#dcfce7", "review": "#dbeafe", "reject": "#ffedd5"}

# advance widths in em, rounded up from DejaVu Sans (the widest of the usual UI fonts for digits): an estimate on
# the wide side only ever leaves more room than needed
_EM = {".": 0.33, " ": 0.33, ",": 0.33, "≥": 0.84, "–": 0.5}
_DIGIT_EM, _LOWER_EM, _UPPER_EM = 0.64, 0.62, 0.74


def text_width(text: str, font_size: float) -> float:
    """Estimated width of `text` in user units (never less than the real width in common sans-serif fonts)."""
    em = 0.0
    for ch in text:
        if ch in _EM:
            em += _EM[ch]
        elif ch.isdigit():
            em += _DIGIT_EM
        elif ch.isupper():
            em += _UPPER_EM
        else:
            em += _LOWER_EM
    return em * font_size + 2.0


def logit(p: float) -> float:
    p = min(max(p, P_MIN), P_MAX)
    return math.log(p / (1.0 - p))


def format_probability(p: float) -> str:
    """Enough decimals that the distance to 0 or 1 keeps two significant digits: 0.007, 0.019, 0.30, 0.992."""
    d = min(p, 1.0 - p)
    decimals = 2 if d >= 0.1 else min(6, max(2, math.floor(-math.log10(max(d, 1e-6))) + 2))
    text = f"{p:.{decimals}f}"
    if decimals > 2:
        text = text.rstrip("0")
        if len(text.split(".")[1]) < 2:
            text += "0" * (2 - len(text.split(".")[1]))
    return text


@dataclass(frozen=True)
class Axis:
    """Log-odds axis from probability `low` to `high` over [BAR_LEFT, BAR_RIGHT]."""

    low: float
    high: float

    @classmethod
    def covering(cls, values: Sequence[float | None]) -> Axis:
        shown = [min(max(v, P_MIN), P_MAX) for v in values if v is not None]
        low = min([DEFAULT_RANGE[0], *shown])
        high = max([DEFAULT_RANGE[1], *shown])
        # a little room beyond the outermost value, so its marker is not on the bar's end
        lo, hi = logit(low) - 0.3, logit(high) + 0.3
        return cls(1.0 / (1.0 + math.exp(-lo)), 1.0 / (1.0 + math.exp(-hi)))

    def x(self, p: float) -> float:
        lo, hi = logit(self.low), logit(self.high)
        t = (logit(p) - lo) / (hi - lo)
        return BAR_LEFT + (BAR_RIGHT - BAR_LEFT) * min(max(t, 0.0), 1.0)


def place_labels(anchors: Sequence[float], widths: Sequence[float], left: float, right: float) -> list[float]:
    """Left edges for labels wanted centred on `anchors` so that none overlaps another or leaves [left, right].

    Labels that would touch form a block that sits where its members want it on average (so two close labels
    move apart symmetrically), clamped to the line; blocks that then touch merge, until none does.
    """
    n = len(anchors)
    if n == 0:
        return []
    need = sum(widths) + GAP * (n - 1)
    if need > right - left:
        raise ValueError(f"labels need {need:.0f} units, only {right - left:.0f} available")
    order = sorted(range(n), key=lambda i: anchors[i])
    blocks: list[list[int]] = [[i] for i in order]

    def layout(block: list[int]) -> tuple[float, float]:
        offsets, at = [], 0.0
        for i in block:
            offsets.append(at)
            at += widths[i] + GAP
        total = at - GAP
        wanted = sum(anchors[i] - widths[i] / 2 - off for i, off in zip(block, offsets, strict=True)) / len(block)
        return min(max(wanted, left), right - total), total

    while True:
        placed = [layout(b) for b in blocks]
        for k in range(len(blocks) - 1):
            if placed[k][0] + placed[k][1] + GAP > placed[k + 1][0]:
                blocks[k : k + 2] = [blocks[k] + blocks[k + 1]]
                break
        else:
            break
    xs = [0.0] * n
    for block, (start, _) in zip(blocks, placed, strict=True):
        for i in block:
            xs[i] = start
            start += widths[i] + GAP
    return xs


def _text(x: float, y: float, text: str, size: int, css: str, weight: str = "normal") -> str:
    return (
        f'<text class="{css}" x="{x:.1f}" y="{y}" font-size="{size}" font-weight="{weight}" '
        f'fill="#334155">{escape(text)}</text>'
    )


def score_gauge_svg(
    score: float | None,
    review: float | None,
    reject: float | None,
    others: Sequence[float] = (),
) -> Markup:
    """The scale of one part: zones, thresholds, its score (the highest of its photos) and `others` (the scores
    of its other photos, small ticks). Any of score / review / reject may be None (no model verdict)."""
    has_thresholds = review is not None and reject is not None
    axis = Axis.covering([score, review, reject, *others])
    label = f"defect score {format_probability(score)}" if score is not None else "no defect score"
    if has_thresholds:
        label += f"; review from {format_probability(review)}, reject from {format_probability(reject)}"  # type: ignore[arg-type]
    parts = [
        f'<svg class="gauge" data-testid="gauge" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(label)} (log-odds scale)" xmlns="http://www.w3.org/2000/svg">'
    ]
    bar_w = BAR_RIGHT - BAR_LEFT
    if has_thresholds:
        lo_review, hi_reject = sorted((review, reject))  # type: ignore[type-var]
        zones = [
            (axis.low, lo_review, ZONE_COLOURS["pass"]),
            (lo_review, hi_reject, ZONE_COLOURS["review"]),
            (hi_reject, axis.high, ZONE_COLOURS["reject"]),
        ]
        for lo, hi, colour in zones:
            x0, x1 = axis.x(lo), axis.x(hi)
            parts.append(
                f'<rect x="{x0:.1f}" y="{BAR_Y}" width="{max(0.0, x1 - x0):.1f}" height="{BAR_H}" fill="{colour}"/>'
            )
    else:
        parts.append(f'<rect x="{BAR_LEFT}" y="{BAR_Y}" width="{bar_w}" height="{BAR_H}" fill="#e2e8f0"/>')
    parts.append(f'<rect x="{BAR_LEFT}" y="{BAR_Y}" width="{bar_w}" height="{BAR_H}" fill="none" stroke="#cbd5e1"/>')

    # axis: ticks under the bar, labelled where they fit
    ticks = [p for p in AXIS_TICKS if axis.low <= p <= axis.high]
    last_right = -math.inf
    for p in ticks:
        x = axis.x(p)
        text = format_probability(p) if p not in (0.5, 0.1, 0.9) else f"{p:g}"
        w = text_width(text, AXIS_SIZE)
        x0 = min(max(x - w / 2, PAD), WIDTH - PAD - w)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{BAR_Y + BAR_H}" y2="{BAR_Y + BAR_H + 3}" stroke="#94a3b8"/>'
        )
        if x0 >= last_right + GAP:
            parts.append(_text(x0, AXIS_Y, text, AXIS_SIZE, "gauge-label gauge-axis"))
            last_right = x0 + w

    # thresholds: a line across the bar each, labels below, pushed apart when close
    if has_thresholds:
        names = [("review", review), ("reject", reject)]
        texts = [f"{name} {format_probability(v)}" for name, v in names]  # type: ignore[arg-type]
        anchors = [axis.x(v) for _, v in names]  # type: ignore[arg-type]
        widths = [text_width(t, LABEL_SIZE) for t in texts]
        lefts = place_labels(anchors, widths, PAD, WIDTH - PAD)
        for (name, _), text, anchor, x0, w in zip(names, texts, anchors, lefts, widths, strict=True):
            parts.append(
                f'<line x1="{anchor:.1f}" x2="{anchor:.1f}" y1="{BAR_Y - 4}" y2="{BAR_Y + BAR_H + 4}" '
                'stroke="#475569" stroke-width="1.5"/>'
            )
            centre = x0 + w / 2
            if abs(centre - anchor) > 3:  # moved off its tick: a leader line says which tick it names
                parts.append(
                    f'<line x1="{anchor:.1f}" x2="{centre:.1f}" y1="{BAR_Y + BAR_H + 4}" y2="{LABEL_Y - LABEL_SIZE}" '
                    'stroke="#94a3b8" stroke-width="1"/>'
                )
            parts.append(_text(x0, LABEL_Y, text, LABEL_SIZE, f"gauge-label gauge-{name}"))

    # the part's other photos: small ticks; its score: a marker with its value above
    for value in others:
        x = axis.x(value)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{BAR_Y + 3}" y2="{BAR_Y + BAR_H - 3}" stroke="#334155"/>')
    if score is not None:
        sx = axis.x(score)
        text = format_probability(score)
        w = 1.1 * text_width(text, LABEL_SIZE)  # bold
        x0 = min(max(sx - w / 2, PAD), WIDTH - PAD - w)
        parts.append(_text(x0, SCORE_Y, text, LABEL_SIZE, "gauge-label gauge-score", weight="bold"))
        parts.append(
            f'<path d="M {sx - 6:.1f} {SCORE_Y + 3} L {sx + 6:.1f} {SCORE_Y + 3} L {sx:.1f} {BAR_Y + 2} Z" '
            f'fill="#0f172a"><title>score {escape(text)}</title></path>'
        )
        parts.append(
            f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{BAR_Y}" y2="{BAR_Y + BAR_H}" stroke="#0f172a" stroke-width="2.5"/>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
