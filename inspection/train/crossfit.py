"""Cross-fitting: every labelled part scored once by a model that never saw it.

K folds by physical part (the ingest's near-duplicate groups), stratified by label. Each fold's model trains on
the other K-1 folds and scores its own; the out-of-fold (OOF) logits of all parts are Platt-scaled and the
thresholds calibrated on them, so they come from every part, not from the handful of good parts one validation
split holds. The production model is then fitted on every part with the schedule the folds found.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inspection.errors import DataError

logger = logging.getLogger(__name__)


def part_folds(targets: np.ndarray, groups: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per sample: whole parts per fold, label-stratified, seeded.

    A part's photos always share a fold. Fails clearly when a class has fewer than 2 parts (no fold model
    could then see that class) and lowers k to the number of parts of the rarer class when it is smaller.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    targets = np.asarray(targets)
    groups = np.asarray(groups)
    parts_per_class = {int(c): len(set(groups[targets == c])) for c in (0, 1)}
    rarest = min(parts_per_class.values())
    if rarest < 2:
        raise DataError(
            f"cross-fitting needs at least 2 parts of each class; found {parts_per_class[0]} good and "
            f"{parts_per_class[1]} defective parts (use validation=split with a hand-made split)"
        )
    if k < 2:
        raise DataError(f"folds: got {k}, allowed >= 2")
    if rarest < k:
        logger.warning("only %d parts of the rarer class: %d folds instead of %d", rarest, rarest, k)
        k = rarest
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = np.full(len(targets), -1, dtype=np.int64)
    for f, (_, held) in enumerate(splitter.split(np.zeros(len(targets)), targets, groups)):
        folds[held] = f
    return folds


def inner_split(
    folds: np.ndarray, held: int, targets: np.ndarray, groups: Sequence[str], share: float = 0.15, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """For fold `held`'s model: (train, stop) indices. About `share` of the other folds' parts (whole parts,
    label-stratified) decide the early stop; the rest train. Never the held-out fold: it is scored, not used."""
    rest = np.flatnonzero(folds != held)
    groups = np.asarray(groups)
    k = max(2, int(round(1 / share)))
    try:
        inner = part_folds(np.asarray(targets)[rest], groups[rest], k, seed + held)
    except DataError:  # too few parts of a class to hold any out: stop on the training parts themselves
        return rest, rest
    return rest[inner != 0], rest[inner == 0]


@dataclass
class FoldReport:
    fold: int
    n_train: int
    n_held: int
    n_parts_held: int
    best_epoch: int | None
    seconds: float
    held_auc: float | None


@dataclass
class CrossFit:
    """The out-of-fold result the thresholds and the final fit are made from."""

    folds: np.ndarray  # fold per pool sample
    oof_logits: np.ndarray  # raw logits of each sample from the fold model that never saw its part
    reports: list[FoldReport] = field(default_factory=list)

    @property
    def k(self) -> int:
        return int(self.folds.max()) + 1

    def final_epochs(self) -> int | None:
        """The schedule for the final fit: the median early-stop point of the folds (None: no schedule)."""
        best = [r.best_epoch for r in self.reports if r.best_epoch is not None]
        return int(np.median(best)) if best else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "folds": [vars(r) for r in self.reports],
            "final_epochs": self.final_epochs(),
        }


def check_folds(folds: np.ndarray, groups: Sequence[str]) -> None:
    """Every part in exactly one fold (the guarantee the OOF scores rest on)."""
    seen: dict[str, set[int]] = {}
    for f, g in zip(folds.tolist(), groups, strict=True):
        seen.setdefault(g, set()).add(f)
    split = [g for g, fs in seen.items() if len(fs) > 1]
    if split or (folds < 0).any():
        raise AssertionError(f"folds split parts {split[:5]} or left samples unassigned")


def fold_summary(folds: np.ndarray, targets: np.ndarray, groups: Sequence[str]) -> str:
    parts = Counter()
    groups = np.asarray(groups)
    for f in range(int(folds.max()) + 1):
        sel = folds == f
        parts[f] = len(set(groups[sel]))
    return ", ".join(
        f"fold {f}: {int((folds == f).sum())} photos / {parts[f]} parts ({int(targets[folds == f].sum())} defect)"
        for f in range(int(folds.max()) + 1)
    )
