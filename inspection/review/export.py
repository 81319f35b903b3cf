"""`inspection review export`: QA-reviewed parts as a labelled image folder (`def_front/`, `ok_front/`).

The layout is the one ingest reads (the real data set's folder names), so the folder can be ingested or used
for training as is. Each image is written as `<sha256>.<ext>`; `review_labels.csv` lists the label, the defect type
QA confirmed (empty when none), reviewer and time of every file. The folders carry the label only: the type reaches
the training manifest through `inspection.ingest.apply_review_labels` (the ingest flow applies the same labels
after ingesting this folder), whatever the plant's label map calls its type folders. A folder that is not a
previous export is never overwritten; a previous export is replaced as a whole (built beside it, then swapped in),
so a label changed by an undo never lingers.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from inspection.decisions import DecisionStore
from inspection.errors import DataError
from inspection.review.config import ReviewConfig
from inspection.review.queries import open_store, reviewed_labels

logger = logging.getLogger(__name__)

FOLDERS = {"defect": "def_front", "ok": "ok_front"}
LABELS_FILE = "review_labels.csv"


@dataclass(frozen=True)
class ReviewExportResult:
    out: Path
    n_defect: int
    n_ok: int
    missing: list[str] = field(default_factory=list)  # sha256 of labelled parts whose image file is gone

    @property
    def n_written(self) -> int:
        return self.n_defect + self.n_ok


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"export target {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / LABELS_FILE).is_file():
        raise DataError(
            f"export target {out} already holds files that are not a previous review export (no {LABELS_FILE}); "
            "give an empty or new folder"
        )


def run_review_export(config: ReviewConfig, out: Path, store: DecisionStore | None = None) -> ReviewExportResult:
    """Write every reviewed part's image under `out/def_front` or `out/ok_front` by its effective QA label."""
    out = Path(out)
    _check_target(out)
    if store is None:
        if not config.store:
            raise DataError("no decision store given: set review.store or pass --store DB_OR_DIR")
        store = open_store(config.store, config.media_dir)
    labels = reviewed_labels(store)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = out.parent / f".{out.name}.building-{os.getpid()}"
    if build.exists():
        shutil.rmtree(build)
    for folder in FOLDERS.values():
        (build / folder).mkdir(parents=True)
    counts = {"defect": 0, "ok": 0}
    missing: list[str] = []
    try:
        with open(build / LABELS_FILE, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", "sha256", "label", "reviewer", "decided_at", "defect_type"])
            for sha, path, label, reviewer, decided_at, kind in labels:
                if path is None or not Path(path).is_file():
                    missing.append(sha)
                    continue
                rel = f"{FOLDERS[label]}/{sha}{Path(path).suffix}"
                shutil.copyfile(path, build / rel)
                writer.writerow([rel, sha, label, reviewer, decided_at.isoformat(), kind or ""])
                counts[label] += 1
        # swap in: the previous export (if any) is removed only once the new one is complete
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(build, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    if missing:
        logger.warning("%d reviewed parts have no image file any more and were left out", len(missing))
    logger.info("exported %d defect + %d ok reviewed parts to %s", counts["defect"], counts["ok"], out)
    return ReviewExportResult(out=out, n_defect=counts["defect"], n_ok=counts["ok"], missing=missing)
