"""Domain adaptation (BatchNorm re-estimation, self-training, few-label fine-tuning) and the domain-gap score.

Torch side: the serving wing never imports this package. Attributes load lazily so `inspection gap --help`
starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_adapt": "inspection.adapt.stage",
    "AdaptResult": "inspection.adapt.stage",
    "AdaptConfig": "inspection.adapt.config",
    "GapConfig": "inspection.adapt.config",
    "domain_gap": "inspection.adapt.gap",
    "image_gap": "inspection.adapt.gap",
    "GapResult": "inspection.adapt.gap",
    "adapt_batchnorm": "inspection.adapt.bn_adapt",
    "write_drift_reference": "inspection.adapt.reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'inspection.adapt' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
