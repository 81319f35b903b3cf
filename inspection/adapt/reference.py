"""Drift reference of a run: what the line should look like for this model (torch side; see inspection/drift.py).

`write_drift_reference(run_dir)` scores the run's validation images and writes `RUN_DIR/drift_reference.json`
(brightness, contrast, score and verdict distributions). Export copies it next to the model so that the runner's
`DriftMonitor.for_model_dir(version_dir)` finds it; adapted runs get one from their target images automatically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inspection.adapt.data import load_valid, subsample
from inspection.adapt.gap import features_and_scores
from inspection.drift import REFERENCE_FILE, DriftReference, compute_reference
from inspection.errors import DataError
from inspection.schemas import Thresholds
from inspection.thresholds import verdicts_for

logger = logging.getLogger(__name__)


MIN_IMAGES = 20  # fewer than this and the histograms are noise


def reference_from_scores(
    items: Sequence[Path | np.ndarray], probs: Sequence[float] | np.ndarray, thresholds: Thresholds, source: str
) -> DriftReference:
    """Drift reference from images (paths or arrays) and the model's scores on them; undecodable ones are skipped."""
    images, ok = load_valid(items)
    probs = np.asarray(probs, dtype=np.float64)[ok]
    return compute_reference(images, probs, list(verdicts_for(probs, thresholds)), source=source)


def write_drift_reference(
    run_dir: Path | str, split: str = "val", max_images: int = 1000, seed: int = 0, batch_size: int = 32
) -> DriftReference:
    """Compute the drift reference of `run_dir` from its `split` images and write it into the run directory."""
    from inspection.train.run_dir import load_run

    run = load_run(run_dir)
    paths = [s.path for s in run.samples.get(split, []) if Path(s.path).is_file()]
    if len(paths) < MIN_IMAGES:
        raise DataError(
            f"{run_dir}: split {split!r} has {len(paths)} readable images; a drift reference needs >= {MIN_IMAGES}"
        )
    paths = subsample(paths, max_images, seed)
    _, probs, kept = features_and_scores(run.net, paths, batch_size)
    reference = reference_from_scores(
        [paths[i] for i in kept], probs, run.card.thresholds, f"{run.card.version} on its {split} split"
    )
    reference.save(Path(run_dir) / REFERENCE_FILE)
    logger.info("drift reference of %s from %d %s images", run.card.version, reference.n, split)
    return reference
