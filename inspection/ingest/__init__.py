"""Ingest: camera drop folders -> a content-addressed store of validated images with a manifest.

Public API (see docs/CONTRACTS.md): `run_ingest`, `load_samples`, `samples_from`, `apply_review_labels`,
`IngestConfig`, `IngestResult`, `Sample`; label conflicts: `label_conflicts`, `relabel_group`.
"""

from inspection.ingest.config import IngestConfig
from inspection.ingest.manifest import (
    LabelConflict,
    Sample,
    apply_review_labels,
    label_conflicts,
    load_samples,
    mixed_label_groups,
    read_records,
    relabel_group,
)
from inspection.ingest.run import IngestResult, run_ingest, samples_from

__all__ = [
    "IngestConfig",
    "IngestResult",
    "LabelConflict",
    "Sample",
    "apply_review_labels",
    "label_conflicts",
    "load_samples",
    "mixed_label_groups",
    "read_records",
    "relabel_group",
    "run_ingest",
    "samples_from",
]
