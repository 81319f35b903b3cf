"""Training stage: fine-tune the pretrained CNN (head | partial | full), evaluate as QA does, calibrate thresholds.

Attributes are imported lazily so that `from inspection.train import calibrate_threshold, evaluate_scores`
(numpy + scikit-learn only) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_train": "inspection.train.trainer",
    "TrainResult": "inspection.train.trainer",
    "TrainConfig": "inspection.train.config",
    "AugmentConfig": "inspection.train.config",
    "load_run": "inspection.train.run_dir",
    "LoadedRun": "inspection.train.run_dir",
    "calibrate_threshold": "inspection.train.calibrate",
    "evaluate_scores": "inspection.train.evaluate",
    "run_evaluate": "inspection.train.evaluate",
    "EvaluateResult": "inspection.train.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'inspection.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
