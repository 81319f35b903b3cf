"""The QA review web app: a queue of flagged parts (repeated photos of one part are one row and one decision)
with heatmaps that point at the defect, decisions that become training labels, a queue of parts whose photos
carry both labels in the ingest store, users and an append-only audit trail (`inspection review serve|user|export`).

No torch: the review app reads the runner's decision store (`inspection.decisions`) and appends to it.
The web stack (FastAPI, Jinja2) is imported only when `create_app` is asked for, so the flows can use
`inspection.review.queries.reviewed_labels` and `run_review_export` without it.
"""

from __future__ import annotations

from typing import Any

from inspection.review.config import ReviewConfig
from inspection.review.export import ReviewExportResult, run_review_export

__all__ = ["ReviewConfig", "ReviewExportResult", "create_app", "run_review_export"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from inspection.review.app import create_app

        return create_app
    raise AttributeError(f"module 'inspection.review' has no attribute {name!r}")
