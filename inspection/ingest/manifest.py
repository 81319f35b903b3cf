"""The manifest: one SQLite database (WAL) per store, one row per source file seen (schemas.ManifestRecord).

Besides the records it keeps the near-duplicate descriptor of each accepted image (so a re-run does not decode
old images again) and the QA review labels (which take precedence over folder labels).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from inspection.errors import DataError
from inspection.schemas import ManifestRecord

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.sqlite"

# column order = ManifestRecord field order; every field is a column so the table can be queried directly
RECORD_FIELDS = tuple(ManifestRecord.model_fields)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {
    ", ".join(
        f"{name} {'TEXT' if name not in ('width', 'height', 'channels_in', 'bit_depth_in') else 'INTEGER'}"
        for name in RECORD_FIELDS
    )
}
);
CREATE UNIQUE INDEX IF NOT EXISTS records_source_sha ON records (source_path, sha256);
CREATE INDEX IF NOT EXISTS records_sha ON records (sha256);
CREATE INDEX IF NOT EXISTS records_status ON records (status);
CREATE TABLE IF NOT EXISTS descriptors (sha256 TEXT PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS review_labels (
    sha256 TEXT NOT NULL, label TEXT NOT NULL, reviewer TEXT NOT NULL, decided_at TEXT NOT NULL,
    PRIMARY KEY (sha256, decided_at, reviewer)
);
"""


@dataclass(frozen=True)
class Sample:
    """One accepted image as the training side sees it."""

    path: Path  # absolute path of the content-addressed copy in the store
    sha256: str
    label: str | None  # "ok" | "defect" | None (unlabelled)
    split: str | None  # "train" | "val" | "test"
    group_id: str  # near-duplicate group: never split across train/val/test
    defect_type: str | None = None  # the defect type the label names (folder `crack/` -> "crack"), if any


def manifest_path(store_or_manifest: Path) -> Path:
    path = Path(store_or_manifest)
    return path / MANIFEST_NAME if path.is_dir() else path


@contextmanager
def connect(path: Path, create: bool = False) -> Iterator[sqlite3.Connection]:
    """Open the manifest (WAL mode, so readers never block the writer); commit on success, roll back on error."""
    path = Path(path)
    if not create and not path.is_file():
        raise DataError(f"no manifest at {path}; expected a store folder holding {MANIFEST_NAME} or the file itself")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=60)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        if create:
            con.executescript(_SCHEMA)
        yield con
        con.commit()
    except BaseException:
        con.rollback()
        raise
    finally:
        con.close()


def _to_row(record: ManifestRecord) -> tuple:
    data = record.model_dump(mode="json")
    return tuple(data[name] for name in RECORD_FIELDS)


def insert_records(con: sqlite3.Connection, records: Iterable[ManifestRecord]) -> int:
    rows = [_to_row(r) for r in records]
    con.executemany(
        f"INSERT OR IGNORE INTO records ({', '.join(RECORD_FIELDS)}) VALUES ({', '.join('?' * len(RECORD_FIELDS))})",
        rows,
    )
    return len(rows)


def read_records(store_or_manifest: Path, status: str | None = None) -> list[ManifestRecord]:
    """All records (optionally of one status) as validated ManifestRecord objects."""
    with connect(manifest_path(store_or_manifest)) as con:
        where = " WHERE status = ?" if status else ""
        rows = con.execute(
            f"SELECT {', '.join(RECORD_FIELDS)} FROM records{where} ORDER BY id", (status,) if status else ()
        )
        return [ManifestRecord(**dict(zip(RECORD_FIELDS, row, strict=True))) for row in rows]


def load_samples(store_or_manifest: Path) -> list[Sample]:
    """Accepted images (labelled or not) of a store, in ingest order, with absolute paths."""
    mpath = manifest_path(store_or_manifest)
    store = mpath.parent.resolve()
    with connect(mpath) as con:
        rows = con.execute(
            "SELECT stored_path, sha256, label, split, group_id FROM records WHERE status = 'accepted' ORDER BY id"
        ).fetchall()
    return [
        Sample(path=store / stored, sha256=sha, label=label, split=split, group_id=group or sha)
        for stored, sha, label, split, group in rows
    ]


def save_descriptors(con: sqlite3.Connection, items: Iterable[tuple[str, np.ndarray]]) -> None:
    con.executemany(
        "INSERT OR REPLACE INTO descriptors (sha256, vector) VALUES (?, ?)",
        [(sha, np.ascontiguousarray(vec, dtype=np.float32).tobytes()) for sha, vec in items],
    )


def load_descriptors(con: sqlite3.Connection) -> dict[str, np.ndarray]:
    return {
        sha: np.frombuffer(blob, dtype=np.float32)
        for sha, blob in con.execute("SELECT sha256, vector FROM descriptors")
    }


def apply_review_labels(store: Path, labels: list[tuple[str, str, str, datetime | str]]) -> int:
    """Record QA labels `(sha256, label, reviewer, decided_at)`; they take precedence over folder labels.

    The latest decision per image wins. Returns how many accepted records changed label. A sha256 not yet in
    the store is remembered and applied when that image is ingested.
    """
    allowed = ("ok", "defect")
    rows = []
    for sha, label, reviewer, decided_at in labels:
        if label not in allowed:
            raise DataError(f"review label {label!r} for {sha[:12]}… is not allowed; allowed: {', '.join(allowed)}")
        when = decided_at.isoformat() if isinstance(decided_at, datetime) else str(decided_at)
        rows.append((sha, label, reviewer, when))
    with connect(manifest_path(store)) as con:
        con.executemany("INSERT OR REPLACE INTO review_labels VALUES (?, ?, ?, ?)", rows)
        changed = con.execute(
            """
            UPDATE records SET label = (
                SELECT label FROM review_labels r WHERE r.sha256 = records.sha256
                ORDER BY decided_at DESC, reviewer DESC LIMIT 1
            ), label_source = 'review'
            WHERE status = 'accepted' AND sha256 IN (SELECT sha256 FROM review_labels)
              AND (label IS NOT (
                SELECT label FROM review_labels r WHERE r.sha256 = records.sha256
                ORDER BY decided_at DESC, reviewer DESC LIMIT 1
              ) OR label_source IS NOT 'review')
            """
        ).rowcount
    logger.info("applied %d review labels; %d stored images changed", len(rows), changed)
    return changed


def review_label_for(con: sqlite3.Connection, sha256: str) -> str | None:
    row = con.execute(
        "SELECT label FROM review_labels WHERE sha256 = ? ORDER BY decided_at DESC, reviewer DESC LIMIT 1", (sha256,)
    ).fetchone()
    return row[0] if row else None


@dataclass(frozen=True)
class LabelConflict:
    """One physical part (near-duplicate group) whose photos carry both labels: unusable until QA settles it."""

    group_id: str
    photos: list[tuple[str, Path, str]]  # (sha256, stored path, current label), ingest order

    @property
    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "defect": 0}
        for _, _, label in self.photos:
            out[label] += 1
        return out


def mixed_label_groups(samples: Iterable[Sample]) -> set[str]:
    """Group ids whose labelled samples carry both labels (the same part called good and defective)."""
    seen: dict[str, set[str]] = {}
    for s in samples:
        if s.label is not None:
            seen.setdefault(s.group_id, set()).add(s.label)
    return {g for g, labels in seen.items() if len(labels) > 1}


def label_conflicts(store_or_manifest: Path) -> list[LabelConflict]:
    """Every group of the store whose photos are labelled both ways, largest first."""
    samples = load_samples(store_or_manifest)
    mixed = mixed_label_groups(samples)
    photos: dict[str, list[tuple[str, Path, str]]] = {g: [] for g in mixed}
    for s in samples:
        if s.group_id in mixed and s.label is not None:
            photos[s.group_id].append((s.sha256, s.path, s.label))
    return sorted((LabelConflict(g, p) for g, p in photos.items()), key=lambda c: (-len(c.photos), c.group_id))


def relabel_group(store: Path, group_id: str, label: str, reviewer: str, decided_at: datetime) -> int:
    """QA's decision on a whole part: every accepted photo of `group_id` gets `label` (a review label, so it
    outranks folder labels and survives re-ingest). Returns how many photos were relabelled."""
    with connect(manifest_path(store)) as con:
        shas = [
            row[0]
            for row in con.execute(
                "SELECT sha256 FROM records WHERE status = 'accepted' AND group_id = ? ORDER BY id", (group_id,)
            )
        ]
    if not shas:
        raise DataError(f"group {group_id!r} has no accepted photos in {store}")
    apply_review_labels(store, [(sha, label, reviewer, decided_at) for sha in shas])
    return len(shas)
