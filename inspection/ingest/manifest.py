"""The manifest: one SQLite database (WAL) per store, one row per source file seen (schemas.ManifestRecord).

Besides the records it keeps the near-duplicate descriptor of each accepted image (so a re-run does not decode
old images again) and the QA review labels (which take precedence over folder labels, for the label and for the
defect type). A manifest written by an older version gets the columns it lacks when it is opened.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from inspection.errors import DataError
from inspection.ingest.labels import LABELS, type_name_problem
from inspection.schemas import ManifestRecord

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.sqlite"

# column order = ManifestRecord field order; every field is a column so the table can be queried directly
RECORD_FIELDS = tuple(ManifestRecord.model_fields)


def _column_type(name: str) -> str:
    return "INTEGER" if name in ("width", "height", "channels_in", "bit_depth_in") else "TEXT"


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{name} {_column_type(name)}" for name in RECORD_FIELDS)}
);
CREATE UNIQUE INDEX IF NOT EXISTS records_source_sha ON records (source_path, sha256);
CREATE INDEX IF NOT EXISTS records_sha ON records (sha256);
CREATE INDEX IF NOT EXISTS records_status ON records (status);
CREATE TABLE IF NOT EXISTS descriptors (sha256 TEXT PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS review_labels (
    sha256 TEXT NOT NULL, label TEXT NOT NULL, reviewer TEXT NOT NULL, decided_at TEXT NOT NULL,
    defect_type TEXT,
    PRIMARY KEY (sha256, decided_at, reviewer)
);
"""
# columns added after the first release: an older manifest gets them (NULL) when it is opened
_ADDED_COLUMNS = {"review_labels": {"defect_type": "TEXT"}}


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
        _add_missing_columns(con)
        yield con
        con.commit()
    except BaseException:
        con.rollback()
        raise
    finally:
        con.close()


def _add_missing_columns(con: sqlite3.Connection) -> None:
    """ALTER TABLE for every column a newer version added (records: any ManifestRecord field) that an existing
    manifest lacks, so an old store keeps working (its new columns read NULL: no type, say)."""
    wanted = {"records": {name: _column_type(name) for name in RECORD_FIELDS}, **_ADDED_COLUMNS}
    for table, columns in wanted.items():
        have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
        if not have:  # table not there (yet): nothing to migrate
            continue
        for name, sql_type in columns.items():
            if name not in have:
                try:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
                except sqlite3.OperationalError as exc:
                    if "duplicate column" not in str(exc):  # another process added it just now: fine
                        raise
                    continue
                logger.info("manifest: added column %s.%s (written by an older version)", table, name)


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
    """Accepted images (labelled or not) of a store, in ingest order, with absolute paths and defect types."""
    mpath = manifest_path(store_or_manifest)
    store = mpath.parent.resolve()
    with connect(mpath) as con:
        rows = con.execute(
            "SELECT stored_path, sha256, label, split, group_id, defect_type FROM records "
            "WHERE status = 'accepted' ORDER BY id"
        ).fetchall()
    return [
        Sample(
            path=store / stored,
            sha256=sha,
            label=label,
            split=split,
            group_id=group or sha,
            defect_type=kind if label == "defect" else None,  # a type only ever qualifies a defect
        )
        for stored, sha, label, split, group, kind in rows
    ]


def type_counts(con: sqlite3.Connection) -> dict[str, int]:
    """Accepted defect photos of the store per defect type (untyped ones not counted), by name."""
    rows = con.execute(
        "SELECT defect_type, COUNT(*) FROM records WHERE status = 'accepted' AND label = 'defect' "
        "AND defect_type IS NOT NULL GROUP BY defect_type ORDER BY defect_type"
    )
    return {kind: int(n) for kind, n in rows}


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


ReviewLabel = tuple[str, str, str, datetime | str] | tuple[str, str, str, datetime | str, str | None]


def apply_review_labels(store: Path, labels: list[ReviewLabel]) -> int:
    """Record QA labels `(sha256, label, reviewer, decided_at[, defect_type])`; they take precedence over folder
    labels, the type included: the latest decision per image sets both its label and its type (a 'defect' label
    without a type leaves the image untyped, as QA named none; 'ok' never has one). Returns how many accepted
    records changed (label or type). A sha256 not yet in the store is remembered and applied when that image is
    ingested.
    """
    rows = []
    for item in labels:
        if len(item) not in (4, 5):
            raise DataError(f"review label {item!r}: expected (sha256, label, reviewer, decided_at[, defect_type])")
        sha, label, reviewer, decided_at = item[:4]
        kind = item[4] if len(item) == 5 else None  # type: ignore[misc]  # length checked above
        if label not in LABELS:
            raise DataError(f"review label {label!r} for {sha[:12]}… is not allowed; allowed: {', '.join(LABELS)}")
        if kind is not None:
            if label != "defect":
                raise DataError(f"review label {label!r} for {sha[:12]}… carries defect type {kind!r}; only defect can")
            problem = type_name_problem(kind)
            if problem:
                raise DataError(f"review label for {sha[:12]}…: {problem}")
        when = decided_at.isoformat() if isinstance(decided_at, datetime) else str(decided_at)
        rows.append((sha, label, reviewer, when, kind))
    with connect(manifest_path(store)) as con:
        con.executemany(
            "INSERT OR REPLACE INTO review_labels (sha256, label, reviewer, decided_at, defect_type) "
            "VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        latest = latest_review_labels(con)
        current = con.execute(
            "SELECT id, sha256, label, defect_type, label_source FROM records WHERE status = 'accepted'"
        ).fetchall()
        updates = []
        for rid, sha, label, kind, source in current:
            if sha not in latest:
                continue
            new_label, new_kind = latest[sha]
            if (new_label, new_kind, "review") != (label, kind, source):
                updates.append((new_label, new_kind, rid))
        con.executemany("UPDATE records SET label = ?, defect_type = ?, label_source = 'review' WHERE id = ?", updates)
    logger.info("applied %d review labels; %d stored images changed", len(rows), len(updates))
    return len(updates)


def latest_review_labels(con: sqlite3.Connection) -> dict[str, tuple[str, str | None]]:
    """sha256 -> (label, defect type) of its latest review label (ties on time: the reviewer sorting last).

    The review decides the type as it decides the label, so the result depends on the reviews alone, never on
    the order in which they were applied; a type only ever qualifies 'defect'."""
    rows = con.execute("SELECT sha256, label, defect_type FROM review_labels ORDER BY decided_at, reviewer")
    return {sha: (label, kind if label == "defect" else None) for sha, label, kind in rows}  # later rows win


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
    outranks folder labels and survives re-ingest). Settled as a defect, the part keeps the type its photos
    carry (the most common one; the conflicts queue decides the label, not the type). Returns how many photos
    were relabelled."""
    with connect(manifest_path(store)) as con:
        rows = con.execute(
            "SELECT sha256, label, defect_type FROM records WHERE status = 'accepted' AND group_id = ? ORDER BY id",
            (group_id,),
        ).fetchall()
    if not rows:
        raise DataError(f"group {group_id!r} has no accepted photos in {store}")
    kinds = Counter(kind for _, was, kind in rows if was == "defect" and kind)
    kind = kinds.most_common(1)[0][0] if label == "defect" and kinds else None
    apply_review_labels(store, [(sha, label, reviewer, decided_at, kind) for sha, _, _ in rows])
    return len(rows)
