"""PNG plots of an evaluation: ROC, precision-recall, confusion matrix, score histograms, worst mistakes.

matplotlib's Agg backend only: training runs on headless machines.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inspection.schemas import Thresholds
from inspection.train.calibrate import as_targets

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc_pr(scores: np.ndarray, targets: np.ndarray, out_dir: Path) -> list[Path]:
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    if targets.min() == targets.max():
        logger.warning("one class only: no ROC/PR curve")
        return []
    plt = _pyplot()
    written = []
    fpr, tpr, _ = roc_curve(targets, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc(fpr, tpr):.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false-reject rate (ok parts flagged)", ylabel="defect recall", title="ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    written.append(out_dir / "roc.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    precision, recall, _ = precision_recall_curve(targets, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision, lw=2, label=f"AUC = {auc(recall, precision):.4f}")
    ax.set(xlabel="defect recall", ylabel="precision", title="Precision-recall", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    written.append(out_dir / "pr.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def plot_confusion(confusion: list[list[int]], out_dir: Path) -> Path:
    plt = _pyplot()
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(cm, cmap="Blues")
    names = ["ok", "defect"]
    ax.set_xticks([0, 1], [f"pred {n}" for n in names])
    ax.set_yticks([0, 1], [f"true {n}" for n in names])
    for i in range(2):
        for j in range(2):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="black" if cm[i, j] < cm.max() / 2 else "white"
            )
    ax.set_title("Confusion at the reject threshold")
    fig.tight_layout()
    path = out_dir / "confusion.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(scores: np.ndarray, targets: np.ndarray, thresholds: Thresholds, out_dir: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(0, 1, 41)
    ax.hist(scores[targets == 0], bins=bins, alpha=0.6, label=f"ok (n={int((targets == 0).sum())})", color="tab:green")
    ax.hist(
        scores[targets == 1], bins=bins, alpha=0.6, label=f"defect (n={int((targets == 1).sum())})", color="tab:red"
    )
    ax.axvline(thresholds.reject, color="k", lw=1.2, label=f"reject {thresholds.reject:.3f}")
    if thresholds.review < thresholds.reject:
        ax.axvline(thresholds.review, color="k", ls="--", lw=1, label=f"review {thresholds.review:.3f}")
    ax.set_yscale("log")
    ax.set(xlabel="defect score", ylabel="parts (log)", title="Score per class")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "score_hist.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_worst_mistakes(
    scores: np.ndarray, targets: np.ndarray, samples: Sequence[Any], thresholds: Thresholds, out_dir: Path, n: int = 16
) -> Path | None:
    """The most confident errors first: escapes (defects with the lowest scores) and false rejects."""
    from inspection.images import read_image

    # distance on the wrong side of the reject threshold; defects count as mistakes only below `reject`
    wrongness = np.where(targets == 1, thresholds.reject - scores, scores - thresholds.reject)
    wrong = np.flatnonzero(wrongness > 0)
    if wrong.size == 0:
        # nothing wrong: show the closest calls instead, which is what a QA engineer asks for next
        wrong = np.argsort(-wrongness)[: min(n, len(scores))]
        title = "No mistakes: the closest calls"
    else:
        wrong = wrong[np.argsort(-wrongness[wrong])][:n]
        title = f"Worst mistakes ({int((wrongness > 0).sum())} in all)"
    if wrong.size == 0:
        return None
    plt = _pyplot()
    cols = min(4, wrong.size)
    rows = int(np.ceil(wrong.size / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        try:
            ax.imshow(read_image(Path(samples[i].path)))
        except Exception as exc:  # a plot must not fail the run because one file vanished
            logger.warning("cannot show %s: %s", samples[i].path, exc)
        truth = "defect" if targets[i] == 1 else "ok"
        ax.set_title(f"{truth}, score {scores[i]:.3f}", fontsize=8, color="red" if wrongness[i] > 0 else "black")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out_dir / "worst_mistakes.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_eval_plots(
    scores: np.ndarray,
    labels: Sequence[Any],
    samples: Sequence[Any],
    thresholds: Thresholds,
    out_dir: Path,
    prefix: str = "",
) -> list[Path]:
    """All evaluation plots into `out_dir` (created); returns the files written."""
    from inspection.train.evaluate import evaluate_scores

    out_dir = Path(out_dir)
    if prefix:
        out_dir = out_dir / prefix
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, dtype=np.float64)
    targets = as_targets(labels)
    written = plot_roc_pr(scores, targets, out_dir)
    written.append(plot_confusion(evaluate_scores(scores, targets, thresholds).confusion, out_dir))
    written.append(plot_histogram(scores, targets, thresholds, out_dir))
    worst = plot_worst_mistakes(scores, targets, samples, thresholds, out_dir)
    if worst is not None:
        written.append(worst)
    return written


def plot_history(history: list[dict[str, Any]], out_dir: Path) -> Path | None:
    """Training and validation loss per epoch."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax.set(xlabel="epoch", ylabel="BCE", title="Training history", yscale="log")
    ax.legend()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "history.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
