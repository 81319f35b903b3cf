"""Defect types: when the labels name them (folders `crack/`, `blowhole/` mapped to `defect:crack`, ...), a
softmax type head on the head's input features, beside the defect head.

The verdict stays the defect head's calibrated P(defect) (= 1 - P(ok)); the type answers *which* defect a flagged
part most likely carries, for QA's pre-filled form and the statistics. Fitted by L-BFGS (multinomial L2 logistic
regression on standardised features) on the defective photos whose type is known; its accuracy is reported out of
fold, on the cross-fitting's folds, per photo and per part.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from inspection.train.config import TrainConfig

logger = logging.getLogger(__name__)

MIN_PARTS_PER_TYPE = 2  # a type seen on one part only cannot be told from that part


def typed_defects(samples: Sequence[Any]) -> tuple[list[int], list[str]]:
    """Indices of defective samples with a type, and the types that have >= MIN_PARTS_PER_TYPE parts."""
    parts: dict[str, set[str]] = {}
    for s in samples:
        t = getattr(s, "defect_type", None)
        if s.label == "defect" and t:
            parts.setdefault(t, set()).add(s.group_id)
    names = sorted(t for t, g in parts.items() if len(g) >= MIN_PARTS_PER_TYPE)
    rare = sorted(set(parts) - set(names))
    if rare:
        logger.warning(
            "defect types %s have fewer than %d parts: not learned (they stay 'defect')", rare, MIN_PARTS_PER_TYPE
        )
    idx = [i for i, s in enumerate(samples) if s.label == "defect" and getattr(s, "defect_type", None) in names]
    return idx, names


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression on standardised x; (weight (T, D), bias (T,)) in raw feature units."""
    from sklearn.linear_model import LogisticRegression

    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit((x - mean) / std, y)
    coef = model.coef_
    intercept = model.intercept_
    if coef.shape[0] == 1:  # sklearn's binary case: one row for class 1; softmax needs both
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w = coef / std
    return w, intercept - w @ mean


def fit_types(
    net: Any, samples: Sequence[Any], features: np.ndarray, folds: np.ndarray | None, config: TrainConfig
) -> dict[str, Any] | None:
    """Fit the type head into `net` (features: the head's input of `samples`); the report, or None without types."""
    from inspection.stats import part_rates

    idx, names = typed_defects(samples)
    if len(names) < 2:
        return None
    x = np.asarray(features, dtype=np.float64)[idx]
    y = np.array([names.index(samples[i].defect_type) for i in idx])
    groups = np.array([samples[i].group_id for i in idx])
    report: dict[str, Any] = {"types": names, "n_photos": len(idx), "photos_per_type": dict(Counter(y.tolist()))}
    report["photos_per_type"] = {names[k]: v for k, v in sorted(report["photos_per_type"].items())}
    if folds is not None:
        f = np.asarray(folds)[idx]
        pred = np.full(len(idx), -1)
        for k in np.unique(f):
            train, held = f != k, f == k
            if len(np.unique(y[train])) < 2:
                continue
            w, b = _fit(x[train], y[train], config.head_c)
            classes = np.unique(y[train])
            scores = x[held] @ w.T + b
            pred[held] = classes[scores.argmax(axis=1)]
        scored = pred >= 0
        right = pred[scored] == y[scored]
        rates = part_rates(right, groups[scored])
        confusion = np.zeros((len(names), len(names)), dtype=int)
        for t, p in zip(y[scored], pred[scored], strict=True):
            confusion[t, p] += 1
        report["oof_accuracy"] = {k: r.to_dict() for k, r in rates.items() if k in ("photo", "part")}
        report["oof_confusion"] = confusion.tolist()  # rows: true type, columns: predicted
    w, b = _fit(x, y, config.head_c)
    net.type_names = tuple(names)
    net.type_head = torch.nn.Linear(w.shape[1], len(names))
    with torch.no_grad():
        net.type_head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        net.type_head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    net.type_head.requires_grad_(False)
    acc = report.get("oof_accuracy", {}).get("photo", {}).get("value")
    logger.info(
        "defect types %s learned from %d photos%s",
        names,
        len(idx),
        f" (out-of-fold accuracy {acc:.3f})" if acc is not None else "",
    )
    return report
