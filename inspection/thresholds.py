"""Verdict from a defect score and the calibrated thresholds (shared by evaluation, export, registry, runner)."""

from __future__ import annotations

import numpy as np

from inspection.schemas import Thresholds, Verdict


def verdict_for(score: float, thresholds: Thresholds) -> Verdict:
    """score >= reject -> reject; review <= score < reject -> review (a human looks); otherwise pass."""
    if score >= thresholds.reject:
        return Verdict.reject
    if score >= thresholds.review:
        return Verdict.review
    return Verdict.pass_


def verdicts_for(scores: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Vectorised `verdict_for`: array of 'pass' / 'review' / 'reject' strings."""
    scores = np.asarray(scores, dtype=np.float64)
    out = np.full(scores.shape, Verdict.pass_.value, dtype=object)
    out[scores >= thresholds.review] = Verdict.review.value
    out[scores >= thresholds.reject] = Verdict.reject.value
    return out
