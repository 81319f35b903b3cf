"""Parity of the exported graph with the PyTorch network it came from, on the run's validation images.

Preprocessing lives inside both, so any difference here is a real export defect (an op lowered differently,
a layout swapped), not a train/serve mismatch: the export fails unless every verdict is identical and the
probabilities agree to `max_prob_diff`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspection.onnx_infer import OnnxModel
from inspection.schemas import Thresholds
from inspection.thresholds import verdicts_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityReport:
    n_images: int
    shapes: list[list[int]]  # distinct (H, W, 3) shapes checked
    max_prob_diff: float
    mean_prob_diff: float
    max_heatmap_diff: float
    verdict_agreement: float  # fraction of images with the same verdict in both engines
    n_verdict_mismatch: int
    max_prob_diff_limit: float
    max_heatmap_diff_limit: float
    passed: bool
    failures: list[str] = field(default_factory=list)
    # the scores compared (PyTorch, ONNX), kept for threshold-tie resolution; not part of the JSON report
    ref_probs: np.ndarray | None = field(default=None, repr=False, compare=False)
    got_probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("ref_probs", "got_probs")}


def resolve_threshold_ties(
    ref_probs: np.ndarray, got_probs: np.ndarray, thresholds: Thresholds
) -> tuple[Thresholds, list[str]] | None:
    """Thresholds under which both engines give every image the verdict PyTorch gave it under `thresholds`.

    The trainer calibrates a threshold *on* a validation defect's score (the highest t keeping the escape rate),
    so that image's verdict is decided by float rounding: ONNX may score it 1e-7 lower and flip it. Moving the
    threshold to the middle of the empty gap around it (taking both engines' scores into account)
    keeps every PyTorch verdict on the validation images, and so the calibrated rates, exactly, and removes the
    tie. Returns None when no such gap exists (then ONNX really orders the scores differently: an export defect).
    """
    ref = ref_probs.astype(np.float64)
    got = got_probs.astype(np.float64)
    lo_all, hi_all = np.minimum(ref, got), np.maximum(ref, got)
    new: dict[str, float] = {}
    notes = []
    for name in ("reject", "review"):
        t = float(getattr(thresholds, name))
        above = ref >= t
        upper = float(lo_all[above].min()) if above.any() else 1.0  # every "above" image, in both engines
        lower = float(hi_all[~above].max()) if (~above).any() else 0.0
        if upper <= lower:
            return None
        if lower < t <= upper:
            new[name] = t  # both engines already agree on every image: keep the calibrated value
            continue
        moved = (lower + upper) / 2 if lower < upper else t
        new[name] = moved
        notes.append(
            f"{name} threshold {t:.9g} sat on a validation score (float rounding decided that image's verdict); "
            f"moved to {moved:.9g}, midway in the empty gap ({lower:.9g}, {upper:.9g}]: every PyTorch verdict "
            "on the validation images is unchanged"
        )
    if thresholds.review == thresholds.reject:
        new["review"] = new["reject"]  # no review band: keep it that way
    new["review"] = min(new["review"], new["reject"])
    return Thresholds(reject=new["reject"], review=new["review"]), notes


def torch_predict(net: torch.nn.Module, images: Sequence[np.ndarray], batch_size: int = 16):
    """PyTorch reference: (probs (N,), list of heatmaps), batching images of equal shape."""
    probs = np.zeros(len(images), dtype=np.float32)
    heatmaps: list = [None] * len(images)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    net.eval()
    with torch.inference_mode():
        for idx in by_shape.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                p, h = net(torch.from_numpy(np.stack([images[i] for i in chunk])))[:2]  # types: not a verdict
                probs[chunk] = p.numpy()
                for j, i in enumerate(chunk):
                    heatmaps[i] = h[j].numpy()
    return probs, heatmaps


def compare(
    ref_probs: np.ndarray,
    ref_heat: list,
    got_probs: np.ndarray,
    got_heat: list,
    thresholds: Thresholds,
    shapes: list[list[int]],
    max_prob_diff: float,
    max_heatmap_diff: float,
) -> ParityReport:
    n = len(ref_probs)
    diff = np.abs(ref_probs.astype(np.float64) - got_probs.astype(np.float64))
    heat_diff = 0.0
    failures = []
    for r, g in zip(ref_heat, got_heat, strict=True):
        if r.shape != g.shape:
            failures.append(f"heatmap shape differs: PyTorch {r.shape}, ONNX {g.shape}")
            heat_diff = float("inf")
            break
        heat_diff = max(heat_diff, float(np.abs(r.astype(np.float64) - g).max()))
    same = verdicts_for(ref_probs, thresholds) == verdicts_for(got_probs, thresholds)
    mismatches = int(n - same.sum())
    max_diff = float(diff.max()) if n else 0.0
    if max_diff > max_prob_diff:
        failures.append(f"max |Δprob| {max_diff:.3g} > limit {max_prob_diff:.3g}")
    if heat_diff > max_heatmap_diff:
        failures.append(f"max |Δheatmap| {heat_diff:.3g} > limit {max_heatmap_diff:.3g}")
    if mismatches:
        failures.append(f"{mismatches} of {n} verdicts differ")
    return ParityReport(
        n_images=n,
        shapes=shapes,
        max_prob_diff=max_diff,
        mean_prob_diff=float(diff.mean()) if n else 0.0,
        max_heatmap_diff=heat_diff,
        verdict_agreement=float(same.mean()) if n else 1.0,
        n_verdict_mismatch=mismatches,
        max_prob_diff_limit=max_prob_diff,
        max_heatmap_diff_limit=max_heatmap_diff,
        passed=not failures,
        failures=failures,
        ref_probs=ref_probs,
        got_probs=got_probs,
    )


def rejudge(report: ParityReport, thresholds: Thresholds) -> ParityReport:
    """The same comparison under other thresholds (the scores do not change, only the verdicts)."""
    assert report.ref_probs is not None and report.got_probs is not None
    same = verdicts_for(report.ref_probs, thresholds) == verdicts_for(report.got_probs, thresholds)
    mismatches = int(report.n_images - same.sum())
    failures = [f for f in report.failures if "verdicts differ" not in f]
    if mismatches:
        failures.append(f"{mismatches} of {report.n_images} verdicts differ")
    return replace(
        report,
        verdict_agreement=float(same.mean()),
        n_verdict_mismatch=mismatches,
        passed=not failures,
        failures=failures,
    )


def check_parity(
    net: torch.nn.Module,
    onnx_path: str | Path,
    images: Sequence[np.ndarray],
    thresholds: Thresholds,
    max_prob_diff: float = 1e-4,
    max_heatmap_diff: float = 1e-3,
    batch_size: int = 16,
    threads: int | None = 2,
) -> ParityReport:
    """Run both engines on `images` (uint8 (H, W, 3), any sizes) and compare probabilities, heatmaps, verdicts."""
    if not images:
        raise ValueError("parity needs at least one image")
    model = OnnxModel(onnx_path, providers=["CPUExecutionProvider"], threads=threads)
    ref_probs, ref_heat = torch_predict(net, images, batch_size)
    got_probs, got_heat = model.predict_images(images, batch_size)
    shapes = sorted({tuple(int(s) for s in img.shape) for img in images})
    report = compare(
        ref_probs, ref_heat, got_probs, got_heat, thresholds, [list(s) for s in shapes], max_prob_diff, max_heatmap_diff
    )
    logger.info(
        "parity on %d images (%d shapes): max |Δprob| %.2e, max |Δheatmap| %.2e, verdict agreement %.4f -> %s",
        report.n_images,
        len(shapes),
        report.max_prob_diff,
        report.max_heatmap_diff,
        report.verdict_agreement,
        "ok" if report.passed else "FAILED: " + "; ".join(report.failures),
    )
    return report
