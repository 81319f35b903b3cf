"""Ingest: camera drop folders -> a content-addressed store of validated images with a manifest.

Public API (see docs/CONTRACTS.md): `run_ingest`, `load_samples`, `samples_from`, `apply_review_labels`,
`IngestConfig`, `IngestResult`, `Sample`.
"""

from inspection.ingest.config import IngestConfig
from inspection.ingest.manifest import Sample, apply_review_labels, load_samples, read_records
from inspection.ingest.run import IngestResult, run_ingest, samples_from

__all__ = [
    "IngestConfig",
    "IngestResult",
    "Sample",
    "apply_review_labels",
    "load_samples",
    "read_records",
    "run_ingest",
    "samples_from",
]
