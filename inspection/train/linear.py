"""The linear defect head fitted by L-BFGS on cached features, and Platt scaling of logits.

On frozen features the head is a convex problem: L2-regularised logistic regression on standardised features
finds its optimum in seconds, deterministically, with one knob (C) instead of a learning-rate schedule, and
the grouped CV on the real photos scores it above AdamW-trained heads. The standardisation is folded back into
the weights, so the network's head reads raw pooled features and the exported graph is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearHead:
    weight: np.ndarray  # (D,), in raw feature units
    bias: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.weight + self.bias


def fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float, balanced: bool = True, sample_weight: np.ndarray | None = None
) -> LinearHead:
    """L2-regularised logistic regression (inverse strength `c`) on standardised `x`; weights in raw units."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6  # constant features (e.g. dead channels) get weight 0, not a division by zero
    model = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=5000, tol=1e-6)
    model.fit((x - mean) / std, y, sample_weight=sample_weight)
    w = model.coef_[0] / std
    return LinearHead(weight=w, bias=float(model.intercept_[0] - (w * mean).sum()))


@dataclass(frozen=True)
class Platt:
    """p = sigmoid(a * logit + b), fitted on out-of-fold logits so that a score is a probability."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        z = self.a * np.asarray(logits, dtype=np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}


def fit_platt(logits: np.ndarray, targets: np.ndarray) -> Platt:
    """Platt scaling (logistic regression of the label on the logit). Mildly regularised, so perfectly
    separated out-of-fold logits give a steep but finite slope instead of diverging."""
    from sklearn.linear_model import LogisticRegression

    logits = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    targets = np.asarray(targets)
    if len(np.unique(targets)) < 2:
        logger.warning("Platt scaling needs both classes; scores left uncalibrated")
        return Platt()
    model = LogisticRegression(C=100.0, max_iter=1000).fit(logits, targets)
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if a <= 0:  # a head that ranks defects below good parts out of fold: do not flip it silently
        logger.warning("Platt slope %.3f <= 0: the out-of-fold logits do not rank defects higher; not calibrated", a)
        return Platt()
    return Platt(a, b)


def calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict[str, float]:
    """Expected calibration error (equal-width bins) and Brier score of probabilities against 0/1 targets."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(probs[sel].mean() - targets[sel].mean())
    return {"ece": float(ece), "brier": float(((probs - targets) ** 2).mean()) if probs.size else float("nan")}
