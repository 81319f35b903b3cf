"""Evaluation as QA sees it: escapes (defects passed), false rejects (good parts scrapped), and the usual curves.

Metrics are taken at the reject threshold (the model's own decision); the review band's effect on the line
(what passes unseen, how much goes to a human) is reported next to them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspection.errors import DataError
from inspection.schemas import Metrics, Thresholds
from inspection.train.calibrate import as_targets

logger = logging.getLogger(__name__)


def evaluate_scores(
    scores: Sequence[float] | np.ndarray, labels: Sequence[Any] | np.ndarray, thresholds: Thresholds | float
) -> Metrics:
    """Metrics of defect scores against labels ('ok'/'defect' or 0/1) at the reject threshold.

    Rates with an empty denominator: escape rate and recall are NaN-free only when defects exist; with no
    defects recall is reported as 1.0 and escape rate as 0.0 (nothing could escape), with no ok parts the
    false-reject rate is 0.0; precision with no predicted defects is 1.0 if there were no defects, else 0.0.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = as_targets(labels)
    if scores.shape != targets.shape:
        raise DataError(f"scores {scores.shape} and labels {targets.shape} differ in length")
    if scores.size == 0:
        raise DataError("nothing to evaluate: no scores")
    reject = thresholds.reject if isinstance(thresholds, Thresholds) else float(thresholds)
    pred = scores >= reject
    tp = int(((targets == 1) & pred).sum())
    fn = int(((targets == 1) & ~pred).sum())
    fp = int(((targets == 0) & pred).sum())
    tn = int(((targets == 0) & ~pred).sum())
    n_def, n_ok = tp + fn, tn + fp
    recall = tp / n_def if n_def else 1.0
    precision = tp / (tp + fp) if (tp + fp) else (1.0 if n_def == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) else 0.0
    roc_auc = pr_auc = None
    if n_def and n_ok:
        from sklearn.metrics import average_precision_score, roc_auc_score

        roc_auc = float(roc_auc_score(targets, scores))
        pr_auc = float(average_precision_score(targets, scores))
    return Metrics(
        n=int(scores.size),
        accuracy=(tp + tn) / scores.size,
        defect_recall=recall,
        escape_rate=1.0 - recall,
        false_reject_rate=fp / n_ok if n_ok else 0.0,
        precision=precision,
        f1=f1,
        roc_auc=roc_auc,
        pr_auc=pr_auc,
        confusion=[[tn, fp], [fn, tp]],
    )


def line_report(scores: np.ndarray, labels: Sequence[Any] | np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """With a human on the review band: what passes unseen, what is scrapped, how much a human sees."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = as_targets(labels)
    passed = scores < thresholds.review
    rejected = scores >= thresholds.reject
    review = ~passed & ~rejected
    n_def, n_ok = int((targets == 1).sum()), int((targets == 0).sum())
    return {
        "thresholds": {"reject": thresholds.reject, "review": thresholds.review},
        "pass_rate": float(passed.mean()),
        "review_rate": float(review.mean()),
        "reject_rate": float(rejected.mean()),
        "escapes": int((passed & (targets == 1)).sum()),
        "line_escape_rate": float((passed & (targets == 1)).sum() / n_def) if n_def else 0.0,
        "ok_reviewed_rate": float((review & (targets == 0)).sum() / n_ok) if n_ok else 0.0,
    }


def part_report(
    scores: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    thresholds: Thresholds,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Per photo and per physical part, with 95 % intervals (inspection.stats): what QA and a plant ask.

    accuracy and defect recall at the reject threshold (the model's own decision); false-reject rate (good photos
    rejected); review share (all photos, and good ones, sent to a human); line escapes (defects passed unseen,
    below the review threshold). Each rate: `photo` (share of photos, bootstrap over parts), `photo_wilson`,
    `part` (mean over parts of the share of each part's photos) and `part_mostly` (parts mostly misjudged).
    """
    from inspection.stats import part_rates

    scores = np.asarray(scores, dtype=np.float64)
    targets = as_targets(labels)
    groups = np.asarray(groups)
    rejected = scores >= thresholds.reject
    review = (scores >= thresholds.review) & ~rejected
    passed = scores < thresholds.review
    defect, ok = targets == 1, targets == 0

    def rates(hits: np.ndarray, where: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
        """`part_mostly` always counts parts mostly *misjudged* (`wrong`), whichever way the rate points."""
        got = {k: r.to_dict() for k, r in part_rates(hits[where], groups[where], n_boot=n_boot).items()}
        got["part_mostly"] = part_rates(wrong[where], groups[where], n_boot=0)["part_mostly"].to_dict()
        return got

    everything = np.ones_like(defect)
    wrong = rejected != defect
    out: dict[str, Any] = {
        "n_photos": int(scores.size),
        "n_parts": int(len(set(groups.tolist()))),
        "n_defect_parts": int(len(set(groups[defect].tolist()))),
        "n_ok_parts": int(len(set(groups[ok].tolist()))),
        "accuracy": rates(~wrong, everything, wrong),
        "review_share": rates(review, everything, review),
    }
    if defect.any():
        out["defect_recall"] = rates(rejected, defect, ~rejected)
        out["line_escape_rate"] = rates(passed, defect, passed)
    if ok.any():
        out["false_reject_rate"] = rates(rejected, ok, rejected)
        out["ok_review_share"] = rates(review, ok, review)
    return out


# the rates of a part report, in the order tables show them
PART_RATES = ("accuracy", "defect_recall", "false_reject_rate", "review_share", "ok_review_share", "line_escape_rate")


def part_report_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """The part report as table rows (markdown / Prefect artifacts): rate, per photo, per part, parts mostly."""

    def fmt(r: dict[str, Any]) -> str:
        return f"{100 * r['value']:.2f} % [{100 * r['low']:.2f}, {100 * r['high']:.2f}]"

    rows = []
    for name in PART_RATES:
        if name in report:
            r = report[name]
            rows.append(
                {
                    "rate": name,
                    "per photo": fmt(r["photo"]),
                    "per part": fmt(r["part"]),
                    "parts mostly misjudged": f"{int(r['part_mostly']['k'])} / {r['part_mostly']['n']}",
                }
            )
    return rows


@dataclass(frozen=True)
class EvaluateResult:
    split: str
    metrics: Metrics
    line: dict[str, Any]
    out_dir: Path
    plots: list[Path] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)  # per photo and per part, with 95 % intervals

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "metrics": self.metrics.model_dump(),
            "line": self.line,
            "parts": self.parts,
            "out_dir": str(self.out_dir),
            "plots": [str(p) for p in self.plots],
        }


def run_evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    out: str | Path | None = None,
    plots: bool = True,
) -> EvaluateResult:
    """Score a run's split (or `data`'s) with its calibrated thresholds; write eval JSON and plots.

    Without `data` the run's own `samples.json` split is used; `split="oof"` reports a cross-fitted run's stored
    out-of-fold scores (no network pass). With `data` (store, manifest or folder) its labelled samples of `split`
    are used; `split="all"` takes every labelled sample.
    """
    import torch

    from inspection.train.data import loader_size, resolve_samples
    from inspection.train.run_dir import load_run
    from inspection.train.trainer import predict_scores

    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    allowed = ("train", "val", "test", "all", "oof")
    if split not in allowed:
        raise DataError(f"split {split!r} is not allowed; allowed: {', '.join(allowed)}")
    out_dir = Path(out) if out else run_dir / f"eval_{split}"
    if split == "oof":
        if data is not None or not (run_dir / "oof_scores.npy").is_file():
            raise DataError(f"split 'oof' reads {run_dir / 'oof_scores.npy'} of a cross-fitted run; no data argument")
        pool = loaded.samples.get("train", [])
        scores = np.load(run_dir / "oof_scores.npy")
        return _report(split, scores, pool, loaded.card.thresholds, out_dir, plots)
    if data is None:
        pool = [s for name, items in loaded.samples.items() for s in items if split in ("all", name)]
    else:
        pool = resolve_samples(data, out_dir / "store")
        pool = [s for s in pool if s.label is not None and (split == "all" or s.split == split)]
    if not pool:
        raise DataError(f"no labelled samples in split {split!r} of {data or run_dir / 'samples.json'}")
    device = torch.device("cpu")
    size_hw = loader_size(pool, loaded.net.preprocess.config)
    with torch.no_grad():  # scoped: a library call must not switch autograd off for its caller
        scores = predict_scores(loaded.net, pool, size_hw, batch_size=64, device=device)
    return _report(split, scores, pool, loaded.card.thresholds, out_dir, plots)


def _report(
    split: str, scores: np.ndarray, pool: Sequence[Any], thresholds: Thresholds, out_dir: Path, plots: bool
) -> EvaluateResult:
    from inspection.train.plots import write_eval_plots

    labels = [s.label for s in pool]
    metrics = evaluate_scores(scores, labels, thresholds)
    line = line_report(scores, labels, thresholds)
    parts = part_report(scores, labels, [s.group_id for s in pool], thresholds)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_eval_plots(scores, labels, pool, thresholds, out_dir) if plots else []
    result = EvaluateResult(split=split, metrics=metrics, line=line, out_dir=out_dir, plots=written, parts=parts)
    (out_dir / "evaluation.json").write_text(json.dumps(result.to_dict(), indent=2))
    logger.info(
        "%s: accuracy %.4f, defect recall %.4f, false-reject rate %.4f on %d parts",
        split,
        metrics.accuracy,
        metrics.defect_recall,
        metrics.false_reject_rate,
        metrics.n,
    )
    return result
