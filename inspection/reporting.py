"""Plain-text views of model cards and metrics for humans: Prefect artifacts, CLI summaries (no torch)."""

from __future__ import annotations

from typing import Any

from inspection.schemas import Metrics, ModelCard

_METRIC_FIELDS = ("n", "accuracy", "defect_recall", "escape_rate", "false_reject_rate", "precision", "f1", "roc_auc")


def metrics_rows(metrics: dict[str, Metrics]) -> list[dict[str, Any]]:
    """One row per split, the figures QA reads first."""
    rows = []
    for split, m in metrics.items():
        row: dict[str, Any] = {"split": split}
        for name in _METRIC_FIELDS:
            value = getattr(m, name)
            row[name] = round(value, 4) if isinstance(value, float) else value
        rows.append(row)
    return rows


def card_markdown(card: ModelCard) -> str:
    lines = [
        f"# Model {card.version}",
        "",
        f"- backbone: `{card.backbone}`, mode: `{card.mode}`, trained on {card.n_train} images",
        f"- created: {card.created_at.isoformat()}",
        f"- data fingerprint: `{card.data_fingerprint[:16]}…`",
        f"- thresholds: reject ≥ {card.thresholds.reject:.4f}, review ≥ {card.thresholds.review:.4f} "
        f"(target escape rate {card.target_escape_rate:.2%})",
    ]
    if card.parent_version:
        lines.append(f"- parent: {card.parent_version}")
    if card.calibration:
        lines += ["", "## Calibration (validation split)", ""]
        lines += [f"- {k}: {v}" for k, v in card.calibration.items()]
    if card.metrics:
        lines += ["", "## Metrics", "", "| split | " + " | ".join(_METRIC_FIELDS) + " |"]
        lines.append("|---" * (len(_METRIC_FIELDS) + 1) + "|")
        for row in metrics_rows(card.metrics):
            lines.append("| " + " | ".join(str(row[k]) for k in ("split", *_METRIC_FIELDS)) + " |")
    if card.files:
        lines += ["", "## Files", ""] + [f"- `{name}` sha256 `{sha[:16]}…`" for name, sha in card.files.items()]
    return "\n".join(lines) + "\n"
