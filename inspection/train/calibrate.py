"""Reject and review thresholds calibrated on the validation split for a target maximum escape rate.

An escape is a defective part that the line passes. The reject threshold is the highest threshold whose
validation escape rate is at most the target (highest, so that as few good parts as possible are scrapped);
scores between the review and the reject threshold go to a human instead of passing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from inspection.errors import DataError
from inspection.schemas import Thresholds

logger = logging.getLogger(__name__)


def as_targets(labels: Sequence[Any] | np.ndarray) -> np.ndarray:
    """0/1 targets from 0/1 numbers, booleans or the strings 'ok'/'defect'."""
    arr = np.asarray(labels)
    if arr.dtype.kind in "US" or arr.dtype == object:
        bad = sorted({str(v) for v in arr.tolist()} - {"ok", "defect"})
        if bad:
            raise DataError(f"labels {bad[:5]} are not allowed; allowed: 'ok', 'defect' (or 0/1)")
        return (arr == "defect").astype(np.int64)
    arr = arr.astype(np.int64)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise DataError(f"labels must be 0 (ok) or 1 (defect); got values {sorted(set(arr.tolist()))[:5]}")
    return arr


def threshold_for_escape_rate(scores: np.ndarray, targets: np.ndarray, target_escape_rate: float) -> float:
    """Highest t such that the share of defects with score < t is <= target_escape_rate."""
    defect_scores = np.sort(scores[targets == 1])
    m = defect_scores.size
    if m == 0:
        raise DataError(
            "cannot calibrate a reject threshold: the calibration split holds no defect parts "
            "(add labelled defects to val, or set thresholds by hand)"
        )
    if not 0.0 <= target_escape_rate < 1.0:
        raise DataError(f"target escape rate {target_escape_rate} is not allowed; allowed 0 <= x < 1")
    # k escapes are allowed; the (k+1)-th lowest defect score is the highest threshold passing at most k of them.
    k = int(math.floor(target_escape_rate * m + 1e-9))
    return float(defect_scores[min(k, m - 1)])


def threshold_for_ok_rate(scores: np.ndarray, targets: np.ndarray, max_ok_rate: float) -> float:
    """Lowest t such that the share of ok parts with score >= t is <= max_ok_rate (QA's capacity for good parts)."""
    ok_scores = np.sort(scores[targets == 0])[::-1]  # most suspicious first
    n = ok_scores.size
    if n == 0:
        raise DataError("cannot size the review band by good parts: the calibration split holds no ok parts")
    if not 0.0 <= max_ok_rate <= 1.0:
        raise DataError(f"review_max_ok_rate {max_ok_rate} is not allowed; allowed 0..1")
    k = int(math.floor(max_ok_rate * n + 1e-9))  # this many good parts may be flagged
    if k >= n:
        return 0.0
    return float(np.nextafter(ok_scores[k], np.inf))  # just above the (k+1)-th most suspicious good part


def rates_at(scores: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    """Escape rate (defects below threshold) and false-reject rate (ok parts at or above it)."""
    defect, ok = scores[targets == 1], scores[targets == 0]
    return {
        "threshold": float(threshold),
        "escape_rate": float((defect < threshold).mean()) if defect.size else float("nan"),
        "false_reject_rate": float((ok >= threshold).mean()) if ok.size else float("nan"),
        "flagged_rate": float((scores >= threshold).mean()) if scores.size else float("nan"),
    }


def calibrate_threshold(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    target_escape_rate: float = 0.005,
    review_escape_rate: float | None = None,
    review_fraction: float | None = None,
    review_max_ok_rate: float | None = None,
) -> Thresholds:
    """Thresholds for the verdict rule (reject >= reject; review in [review, reject); else pass).

    The review threshold, first rule that is set: `review_escape_rate` calibrates it like the reject threshold
    for this stricter target (0.0 = below the least suspicious validation defect); `review_max_ok_rate` puts it
    where at most this share of good validation parts is flagged (sized by QA's capacity, never above reject);
    `review_fraction` puts it at that fraction of the reject threshold. With none, there is no review band.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = as_targets(labels)
    if scores.shape != targets.shape:
        raise DataError(f"scores {scores.shape} and labels {targets.shape} differ in length")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or infinity; the model output is broken")
    reject = threshold_for_escape_rate(scores, targets, target_escape_rate)
    if review_escape_rate is not None:
        if review_escape_rate > target_escape_rate:
            raise DataError(
                f"review_escape_rate {review_escape_rate} is above target_escape_rate {target_escape_rate}: "
                "the review threshold must be stricter (lower) than the reject threshold"
            )
        review = min(reject, threshold_for_escape_rate(scores, targets, review_escape_rate))
    elif review_max_ok_rate is not None:
        review = min(reject, threshold_for_ok_rate(scores, targets, review_max_ok_rate))
    elif review_fraction is not None:
        if not 0.0 <= review_fraction <= 1.0:
            raise DataError(f"review_fraction {review_fraction} is not allowed; allowed 0..1")
        review = reject * review_fraction
    else:
        review = reject
    return Thresholds(reject=float(np.clip(reject, 0.0, 1.0)), review=float(np.clip(review, 0.0, 1.0)))


def calibration_report(
    scores: np.ndarray, labels: Sequence[Any] | np.ndarray, thresholds: Thresholds, target_escape_rate: float
) -> dict[str, Any]:
    """What the thresholds gave on the calibration split (stored in the model card)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = as_targets(labels)
    reject = rates_at(scores, targets, thresholds.reject)
    review = rates_at(scores, targets, thresholds.review)
    return {
        "split": "val",
        "n": int(scores.size),
        "n_defect": int(targets.sum()),
        "target_escape_rate": float(target_escape_rate),
        "reject": reject,
        "review": review,
        # what the line does with a human in the loop: only parts below `review` pass unseen
        "line_escape_rate": review["escape_rate"],
        "review_rate": float(((scores >= thresholds.review) & (scores < thresholds.reject)).mean()),
    }
