"""Drift reference of a run: what the line should look like for this model (torch side; see inspection/drift.py).

`write_drift_reference(run_dir)` scores the run's validation images and writes `RUN_DIR/drift_reference.json`
(brightness, contrast, score and verdict distributions). Export copies it next to the model so that the runner's
`DriftMonitor.for_model_dir(version_dir)` finds it; adapted runs get one from their target images automatically.
"""

from __future__ import annotations

import logging
from pathlib import Path

from inspection.adapt.data import load_valid, subsample
from inspection.adapt.gap import features_and_scores
from inspection.drift import REFERENCE_FILE, DriftReference, compute_reference
from inspection.errors import DataError
from inspection.thresholds import verdicts_for

logger = logging.getLogger(__name__)


def write_drift_reference(
    run_dir: Path | str, split: str = "val", max_images: int = 1000, seed: int = 0, batch_size: int = 32
) -> DriftReference:
    """Compute the drift reference of `run_dir` from its `split` images and write it into the run directory."""
    from inspection.train.run_dir import load_run

    run = load_run(run_dir)
    paths = [s.path for s in run.samples.get(split, []) if Path(s.path).is_file()]
    if len(paths) < 20:
        raise DataError(f"{run_dir}: split {split!r} has {len(paths)} readable images; a drift reference needs >= 20")
    paths = subsample(paths, max_images, seed)
    _, probs, kept = features_and_scores(run.net, paths, batch_size)
    images, ok = load_valid([paths[i] for i in kept])
    verdicts = list(verdicts_for(probs[ok], run.card.thresholds))
    reference = compute_reference(images, probs[ok], verdicts, source=f"{run.card.version} on its {split} split")
    reference.save(Path(run_dir) / REFERENCE_FILE)
    logger.info("drift reference of %s from %d %s images", run.card.version, reference.n, split)
    return reference
