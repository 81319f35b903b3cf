"""The score scale: log-odds axis, values printed with the digits that matter, labels that never overlap.

The browser test (tests/integration/test_review_browser.py) measures the real label boxes in Chromium; these
check the layout with the width estimate the server uses, over many threshold pairs.
"""

from __future__ import annotations

import itertools
import re

import pytest

from inspection.review.gauge import (
    GAP,
    LABEL_SIZE,
    WIDTH,
    Axis,
    format_probability,
    place_labels,
    score_gauge_svg,
    text_width,
)

TEXT = re.compile(r'<text class="([^"]+)" x="([-\d.]+)" y="(\d+)" font-size="(\d+)"[^>]*>([^<]*)</text>')


def _boxes(svg: str) -> list[tuple[str, float, float, int, str]]:
    """(class, left, right, baseline, text) of every label, with the server's width estimate."""
    out = []
    for css, x, y, size, text in TEXT.findall(svg):
        w = text_width(text, int(size)) * (1.1 if "gauge-score" in css else 1.0)
        out.append((css, float(x), float(x) + w, int(y), text))
    return out


@pytest.mark.parametrize(
    ("p", "text"),
    [(0.007, "0.007"), (0.019, "0.019"), (0.992, "0.992"), (0.3, "0.30"), (0.7, "0.70"), (0.0004, "0.0004"),
     (0.9999, "0.9999"), (0.95, "0.95"), (0.051, "0.051"), (0.5, "0.50")],
)  # fmt: skip
def test_probabilities_keep_the_digits_that_matter(p: float, text: str) -> None:
    assert format_probability(p) == text


def test_log_odds_axis_gives_low_thresholds_and_high_scores_room() -> None:
    axis = Axis.covering([0.992, 0.007, 0.019])
    x_review, x_reject, x_score = axis.x(0.007), axis.x(0.019), axis.x(0.992)
    assert x_reject - x_review > 20  # on a linear 0..1 bar of the same width they were 4 units apart
    assert x_score - x_reject > 150
    assert axis.x(0.5) == pytest.approx((axis.x(0.1) + axis.x(0.9)) / 2)  # symmetric around 0.5
    assert axis.x(0.0) >= 0 and axis.x(1.0) <= WIDTH  # 0 and 1 are clamped, not infinite
    wide = Axis.covering([1e-6])
    assert wide.low <= 1e-4  # the axis reaches as low as its floor to show a very low threshold


PAIRS = [
    (0.007, 0.019), (0.3, 0.7), (0.5, 0.51), (0.0001, 0.0002), (0.001, 0.0011), (0.98, 0.99), (0.9998, 0.9999),
    (0.0001, 0.9999), (0.019, 0.007), (0.2, 0.2),
]  # fmt: skip
SCORES = [None, 0.0, 0.0001, 0.007, 0.012, 0.5, 0.992, 0.99999, 1.0]


@pytest.mark.parametrize(("review", "reject"), PAIRS)
def test_labels_never_overlap_nor_leave_the_scale(review: float, reject: float) -> None:
    for score in SCORES:
        svg = str(score_gauge_svg(score, review, reject, others=[0.2, 0.9]))
        boxes = _boxes(svg)
        assert {b[4] for b in boxes} >= {f"review {format_probability(review)}", f"reject {format_probability(reject)}"}
        for _, left, right, _, text in boxes:
            assert left >= 0 and right <= WIDTH, (text, left, right)
        for a, b in itertools.combinations(boxes, 2):
            if a[3] == b[3]:  # same line
                assert a[2] + 1 <= b[1] or b[2] + 1 <= a[1], (a, b, review, reject, score)
        lines = sorted({b[3] for b in boxes})
        assert all(lo + LABEL_SIZE <= hi for lo, hi in itertools.pairwise(lines))  # lines do not touch either


def test_the_page_example_prints_all_three_values() -> None:
    svg = str(score_gauge_svg(0.992, 0.007, 0.019))
    texts = [b[4] for b in _boxes(svg)]
    assert "review 0.007" in texts and "reject 0.019" in texts and "0.992" in texts
    assert "log-odds" in svg and "review from 0.007, reject from 0.019" in svg
    axis = [b for b in _boxes(svg) if "gauge-axis" in b[0]]
    assert [b[4] for b in axis] == ["0.001", "0.01", "0.1", "0.5", "0.9", "0.99", "0.999"]
    assert all(b[3] > 0 for b in axis)


def test_without_thresholds_or_score() -> None:
    svg = str(score_gauge_svg(None, None, None))
    assert "review" not in svg and "<svg" in svg and "no defect score" in svg
    svg = str(score_gauge_svg(0.4, None, None))
    assert [b[4] for b in _boxes(svg) if "gauge-score" in b[0]] == ["0.40"]
    assert "<script" not in str(score_gauge_svg(0.4, 0.1, 0.2))


def test_place_labels_keeps_order_spreads_symmetrically_and_refuses_what_cannot_fit() -> None:
    xs = place_labels([100, 102], [40, 40], 0, 360)
    assert xs[0] + 40 + GAP <= xs[1]
    assert (xs[0] + 20 + xs[1] + 20) / 2 == pytest.approx(101)  # both moved, by the same amount
    assert place_labels([50, 300], [40, 40], 0, 360) == [30, 280]  # far apart: untouched
    xs = place_labels([0, 1, 2], [40, 40, 40], 10, 360)
    assert xs[0] == 10 and xs[0] < xs[1] < xs[2]
    with pytest.raises(ValueError, match="labels need"):
        place_labels([10, 20], [200, 200], 0, 360)
    assert place_labels([], [], 0, 10) == []
