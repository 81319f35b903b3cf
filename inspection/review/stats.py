"""Review statistics and their charts: flagged parts per hour, override rate, confirmed defects by type, the
types QA confirmed against those a typed model predicted (a confusion table), and the same per model version.
Counting happens in SQL (portable GROUP BYs); only flagged parts' timestamps are read
back for the hourly bins, so a week of a busy line stays cheap. Charts are plain server-rendered SVG (no
JavaScript, no external library), sized with a viewBox so they scale with the page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from markupsafe import Markup, escape
from sqlalchemy import func, select

from inspection.decisions import DecisionStore, inspections, reviews
from inspection.review.queries import FLAGGED_VERDICTS, effective_subquery
from inspection.schemas import DefectType, ReviewAction

logger = logging.getLogger(__name__)

MAX_HOURLY_BINS = 24 * 31  # beyond a month the hourly chart is unreadable: bins become days
UNSPECIFIED = "unspecified"  # confirmed a defect without naming a type
NO_PREDICTION = "none"  # the model gave no type (an untyped model, or a part held without a verdict)
OVERRIDDEN = "ok"  # QA passed the part: the model's type (if any) was for a defect that is not there


@dataclass
class VersionStats:
    model_version: str
    inspected: int = 0
    flagged: int = 0
    decided: int = 0
    confirmed: int = 0
    overridden: int = 0

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.inspected if self.inspected else None

    @property
    def override_rate(self) -> float | None:
        return self.overridden / self.decided if self.decided else None


@dataclass
class ReviewStats:
    since: datetime
    until: datetime
    bin_hours: int  # 1 (hourly) or 24 (daily) for long ranges
    inspected: int = 0
    flagged: int = 0
    decided: int = 0
    confirmed: int = 0
    overridden: int = 0
    flagged_bins: list[tuple[datetime, int, int]] = field(default_factory=list)  # (bin start, reject, review)
    defects_by_type: dict[str, int] = field(default_factory=dict)  # QA-confirmed defects per type
    predicted_by_type: dict[str, int] = field(default_factory=dict)  # inspections per type the model answered
    # decided flagged inspections: QA's answer (a type, UNSPECIFIED or OVERRIDDEN) -> the model's type (or
    # NO_PREDICTION) -> count
    type_confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    per_version: list[VersionStats] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        return self.flagged - self.decided

    @property
    def override_rate(self) -> float | None:
        """Share of decided flagged parts that QA passed: the observed false-reject rate of the model."""
        return self.overridden / self.decided if self.decided else None

    @property
    def type_compared(self) -> int:
        """Confirmed defects where both QA and the model named a type."""
        return sum(
            n
            for qa, row in self.type_confusion.items()
            if qa not in (UNSPECIFIED, OVERRIDDEN)
            for model, n in row.items()
            if model != NO_PREDICTION
        )

    @property
    def type_agreement(self) -> float | None:
        """Of the confirmed defects both typed, the share where QA confirmed the model's type."""
        same = sum(row.get(qa, 0) for qa, row in self.type_confusion.items() if qa not in (UNSPECIFIED, OVERRIDDEN))
        return same / self.type_compared if self.type_compared else None

    def confusion_axes(self) -> tuple[list[str], list[str]]:
        """(rows, columns) of the confusion table: types in both orders alike (shared types first, so the
        diagonal is agreement), then UNSPECIFIED / OVERRIDDEN rows and the NO_PREDICTION column."""
        qa = {k for k in self.type_confusion if k not in (UNSPECIFIED, OVERRIDDEN)}
        model = {m for row in self.type_confusion.values() for m in row if m != NO_PREDICTION}
        types = sorted(qa & model) + sorted(qa - model) + sorted(model - qa)
        rows = [t for t in types if t in qa] + [k for k in (UNSPECIFIED, OVERRIDDEN) if k in self.type_confusion]
        cols = [t for t in types if t in model]
        if any(NO_PREDICTION in row for row in self.type_confusion.values()):
            cols.append(NO_PREDICTION)
        return rows, cols


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _floor_hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def compute_stats(store: DecisionStore, since: datetime, until: datetime, station: str | None = None) -> ReviewStats:
    """Statistics of the parts inspected in [since, until) (UTC), optionally at one station."""
    since, until = _utc(since), _utc(until)
    span_hours = max(1.0, (until - since).total_seconds() / 3600)
    bin_hours = 1 if span_hours <= MAX_HOURLY_BINS else 24
    out = ReviewStats(since=since, until=until, bin_hours=bin_hours)
    where = [inspections.c.timestamp >= since, inspections.c.timestamp < until]
    if station:
        where.append(inspections.c.station == station)
    version_col = func.coalesce(inspections.c.model_version, "(none)")
    eff = effective_subquery()
    decision = reviews.alias("decision")
    versions: dict[str, VersionStats] = {}

    def vs(name: str) -> VersionStats:
        return versions.setdefault(name, VersionStats(name))

    with store.engine.connect() as conn:
        counts = select(version_col, inspections.c.verdict, func.count()).where(*where)
        for version, verdict, n in conn.execute(counts.group_by(version_col, inspections.c.verdict)):
            v = vs(version)
            v.inspected += n
            if verdict in FLAGGED_VERDICTS:
                v.flagged += n
        predicted = inspections.c.defect_type
        decided_rows = conn.execute(
            select(version_col, decision.c.action, decision.c.defect_type, predicted, func.count())
            .select_from(inspections)
            .join(eff, eff.c.request_id == inspections.c.request_id)
            .join(decision, decision.c.id == eff.c.effective_id)
            .where(*where, inspections.c.verdict.in_(FLAGGED_VERDICTS))
            .group_by(version_col, decision.c.action, decision.c.defect_type, predicted)
        ).all()
        predicted_rows = conn.execute(
            select(predicted, func.count()).where(*where, predicted.is_not(None)).group_by(predicted)
        ).all()
        flagged = inspections.c.verdict.in_(FLAGGED_VERDICTS)
        times = select(inspections.c.timestamp, inspections.c.verdict).where(*where, flagged)
        flagged_times = conn.execute(times).all()

    by_type = {d.value: 0 for d in DefectType}
    by_type[UNSPECIFIED] = 0
    confusion: dict[str, dict[str, int]] = {}
    for version, action, defect_type, predicted_type, n in decided_rows:
        v = vs(version)
        v.decided += n
        if action == ReviewAction.confirm_defect.value:
            v.confirmed += n
            by_type[defect_type or UNSPECIFIED] = by_type.get(defect_type or UNSPECIFIED, 0) + n
            answer = defect_type or UNSPECIFIED
        elif action == ReviewAction.override_ok.value:
            v.overridden += n
            answer = OVERRIDDEN
        else:
            continue
        row = confusion.setdefault(answer, {})
        row[predicted_type or NO_PREDICTION] = row.get(predicted_type or NO_PREDICTION, 0) + n
    out.defects_by_type = by_type
    out.predicted_by_type = {t: int(n) for t, n in sorted(predicted_rows)}
    out.type_confusion = confusion
    out.per_version = sorted(versions.values(), key=lambda v: v.model_version)
    for v in out.per_version:
        out.inspected += v.inspected
        out.flagged += v.flagged
        out.decided += v.decided
        out.confirmed += v.confirmed
        out.overridden += v.overridden

    step = timedelta(hours=bin_hours)
    start = _floor_hour(since)
    if bin_hours == 24:
        start = start.replace(hour=0)
    n_bins = max(1, int((until - start) / step + 0.999999))
    bins = [[0, 0] for _ in range(n_bins)]
    for ts, verdict in flagged_times:
        index = int((_utc(ts) - start) / step)
        if 0 <= index < n_bins:
            bins[index][0 if verdict == "reject" else 1] += 1
    out.flagged_bins = [(start + i * step, rej, rev) for i, (rej, rev) in enumerate(bins)]
    return out


# -- SVG charts ----------------------------------------------------------------------------------------------

# Colours chosen for contrast on white and for colour-blind readers (Okabe-Ito orange / blue).
REJECT_COLOUR = "#c2410c"
REVIEW_COLOUR = "#2563eb"
BAR_COLOUR = "#334155"


def _nice_max(value: int) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if value <= step * 4:
            return step * 4
    return int(value * 1.1) + 1


def flagged_chart_svg(stats: ReviewStats, width: int = 900, height: int = 220) -> Markup:
    """Stacked bars of reject (bottom) and review (top) parts per bin, with a y axis and a few time labels."""
    left, right, top, bottom = 44, 8, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    bins = stats.flagged_bins
    ymax = _nice_max(max((r + v for _, r, v in bins), default=0) or 1)
    bar_w = plot_w / max(1, len(bins))
    parts: list[str] = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="flagged parts per '
        f'{"hour" if stats.bin_hours == 1 else "day"}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i in range(5):  # grid lines and y labels
        value = ymax * i // 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#475569">{value}</text>'
        )
    label_every = max(1, len(bins) // 8)
    for i, (start, rej, rev) in enumerate(bins):
        x = left + i * bar_w
        h_rej = plot_h * rej / ymax
        h_rev = plot_h * rev / ymax
        when = start.strftime("%Y-%m-%d %H:00") if stats.bin_hours == 1 else start.strftime("%Y-%m-%d")
        tip = escape(f"{when} UTC: {rej} reject, {rev} review")
        w = max(1.0, bar_w - 1.5)
        if rej:
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h_rej:.1f}" width="{w:.1f}" height="{h_rej:.1f}" '
                f'fill="{REJECT_COLOUR}"><title>{tip}</title></rect>'
            )
        if rev:
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_h - h_rej - h_rev:.1f}" width="{w:.1f}" height="{h_rev:.1f}" '
                f'fill="{REVIEW_COLOUR}"><title>{tip}</title></rect>'
            )
        if i % label_every == 0 and x < width - right - 70:  # no label cut off at the right edge
            label = start.strftime("%d %b %H:00") if stats.bin_hours == 1 else start.strftime("%d %b")
            parts.append(f'<text x="{x:.1f}" y="{height - 12}" font-size="11" fill="#475569">{escape(label)}</text>')
    parts.append(
        f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#94a3b8"/></svg>'
    )
    return Markup("".join(parts))


def hbar_chart_svg(items: list[tuple[str, float]], value_format: str = "{:.0f}", width: int = 440) -> Markup:
    """Horizontal bars, one row per (label, value); labels are escaped."""
    row_h, left, right = 28, 130, 56
    height = max(1, len(items)) * row_h + 8
    vmax = max((v for _, v in items), default=0) or 1
    plot_w = width - left - right
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value) in enumerate(items):
        y = 4 + i * row_h
        w = plot_w * value / vmax
        text = escape(value_format.format(value))
        parts.append(
            f'<text x="{left - 8}" y="{y + 18}" text-anchor="end" font-size="13" fill="#1e293b">{escape(label)}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y + 4}" width="{max(w, 0.0):.1f}" height="{row_h - 10}" rx="2" fill="{BAR_COLOUR}">'
            f"<title>{escape(label)}: {text}</title></rect>"
        )
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 18}" font-size="13" fill="#1e293b">{text}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def stats_summary(stats: ReviewStats) -> dict[str, Any]:
    """Plain numbers for the JSON endpoint and tests."""
    return {
        "since": stats.since.isoformat(),
        "until": stats.until.isoformat(),
        "inspected": stats.inspected,
        "flagged": stats.flagged,
        "decided": stats.decided,
        "waiting": stats.waiting,
        "confirmed": stats.confirmed,
        "overridden": stats.overridden,
        "override_rate": stats.override_rate,
        "defects_by_type": stats.defects_by_type,
        "predicted_by_type": stats.predicted_by_type,
        "type_confusion": stats.type_confusion,
        "type_agreement": stats.type_agreement,
        "flagged_bins": [(t.isoformat(), rej, rev) for t, rej, rev in stats.flagged_bins],
        "per_version": [
            {
                "model_version": v.model_version,
                "inspected": v.inspected,
                "flagged": v.flagged,
                "flag_rate": v.flag_rate,
                "decided": v.decided,
                "confirmed": v.confirmed,
                "overridden": v.overridden,
                "override_rate": v.override_rate,
            }
            for v in stats.per_version
        ],
    }
