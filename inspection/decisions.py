"""The decision store: every verdict the runner gives, and every QA decision on it (no torch).

The runner writes one `inspections` row per answered request *before* the answer leaves; the review app reads
them and appends `reviews` rows (append-only; a correction points at the decision it `replaces`). Images of parts
that were not passed are kept content-addressed next to the database (`MEDIA/images/<sha[:2]>/<sha>.<ext>`) with
the model's raw heatmap (`MEDIA/heatmaps/<request_id>.png`, a tiny 16-bit grey PNG of the h x w map: microseconds
to write on the line); the overlay QA looks at (the map inside the part's silhouette, one hue, peak ringed:
`inspection.overlay`) is rendered from both when it is asked for (`overlay_png`), never on the line's critical path.

SQLite in WAL mode is the default (one file, readers never block the writer); a PostgreSQL URL works the same
because only SQLAlchemy Core is used. The `folder_files` table lets folder mode inspect each dropped file exactly
once across restarts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError as SAOperationalError

from inspection.errors import InspectionError
from inspection.images import decode_image, sniff_format
from inspection.overlay import MAX_OPACITY, render_overlay
from inspection.schemas import InspectionResult, Thresholds, Verdict

logger = logging.getLogger(__name__)

metadata = MetaData()

inspections = Table(
    "inspections",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("part_id", String(256), nullable=False, index=True),
    Column("station", String(128), nullable=False, index=True),
    Column("timestamp", DateTime(timezone=True), nullable=False, index=True),  # UTC
    Column("verdict", String(16), nullable=False, index=True),
    Column("defect_score", Float, nullable=True),  # None: no model verdict (bad image, model error)
    Column("reject_threshold", Float, nullable=True),
    Column("review_threshold", Float, nullable=True),
    Column("model_version", String(128), nullable=True, index=True),
    Column("latency_ms", Float, nullable=False),
    Column("reason", Text, nullable=True),
    Column("image_sha256", String(64), nullable=True, index=True),
    Column("image_path", Text, nullable=True),  # relative to media_dir
    Column("heatmap_path", Text, nullable=True),  # relative to media_dir
    Column("source", String(16), nullable=False),  # 'http' | 'folder' | 'opcua'
    # added after the first release (nullable: `add_missing_columns` adds them to older databases on open)
    Column("product", String(64), nullable=True, index=True),  # the product whose model judged it / the request named
    Column("defect_type", String(32), nullable=True),  # a typed model's most likely type of a flagged part
    Column("defect_type_probability", Float, nullable=True),
)

reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, index=True),
    Column("action", String(32), nullable=False),
    Column("defect_type", String(32), nullable=True),
    Column("comment", Text, nullable=True),
    Column("reviewer", String(128), nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    Column("replaces", Integer, nullable=True),  # id of the review this one supersedes
)

# Folder mode: identity of each dropped file already decided, written in the same transaction as its decision.
folder_files = Table(
    "folder_files",
    metadata,
    Column("identity", String(128), primary_key=True),  # sha256 of the bytes + ':' + sha256 of the file name
    Column("file_name", Text, nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("destination", String(16), nullable=False),  # 'processed' | 'flagged'
    Column("emitted", Integer, nullable=False, default=0),  # 1 once the JSON line is written
    Column("decided_at", DateTime(timezone=True), nullable=False),
)

# -- MQTT outbox (inspection/runner/outbox.py relays it) -------------------------------------------------------
# One row per verdict to publish, inserted in the same transaction as its decision: a broker outage, a crash or a
# restart between deciding and publishing loses nothing. The relay publishes rows in id order and deletes each one
# once the broker has acknowledged it (QoS 1). `producer` is the runner that relays it (several runners may share
# one PostgreSQL store).
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("producer", String(128), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("topic", Text, nullable=False),
    Column("payload", Text, nullable=False),  # the InspectionResult JSON, as published
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_outbox_producer_id", "producer", "id"),
)
# -- end of the MQTT outbox table ---------------------------------------------------------------------------------

SOURCES = ("http", "folder", "opcua")
KEEP_VERDICTS = (Verdict.review, Verdict.reject)  # parts a human may look at: keep their images
_EXTENSIONS = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "tiff": "tif"}


class DecisionStoreError(InspectionError):
    """The decision store cannot be used as asked."""


class StoreBusyError(DecisionStoreError):
    """Another writer (the review app, another thread) held the store longer than this write may wait."""


BUSY_TIMEOUT_MS = 30_000  # writes without a deadline of their own wait this long for another writer's lock


def store_full(exc: BaseException) -> bool:
    """True when a write failed for lack of space (the database's or the media files' filesystem)."""
    seen: BaseException | None = exc
    for _ in range(8):  # SQLAlchemy and our own errors wrap the OSError / sqlite3 error
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if "database or disk is full" in text or "no space left" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def store_busy(exc: BaseException) -> bool:
    """True when a write failed only because another writer held the store (retrying at once would wait again)."""
    if isinstance(exc, StoreBusyError):
        return True
    text = str(exc).lower()
    return isinstance(exc, SAOperationalError) and ("database is locked" in text or "database is busy" in text)


def _as_url(url_or_path: str | Path) -> tuple[str, Path | None]:
    text = str(url_or_path)
    if "://" in text:
        return text, None
    path = Path(text)
    if path.suffix == "" or path.is_dir():
        path = path / "decisions.sqlite"
    return f"sqlite:///{path}", path


def _utc(value: datetime) -> datetime:
    # SQLite returns naive datetimes; everything we store is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        # a full disk fails the write or the close: leave no partial file behind to hold the space
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _unit_map(stored: np.ndarray | None, rel: str) -> np.ndarray:
    """A decoded heatmap file (16-bit or 8-bit grey) as float32 in [0, 1]."""
    if stored is None or stored.ndim != 2:
        raise DecisionStoreError(f"heatmap file {rel} is missing or not a grey map")
    return stored.astype(np.float32) / (65535.0 if stored.dtype == np.uint16 else 255.0)


def heatmap_overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = MAX_OPACITY, find_part: bool = True
) -> np.ndarray:
    """uint8 RGB image (H, W, 3) + heatmap (h, w) in [0, 1], any h x w -> uint8 RGB overlay (H, W, 3).

    The map is upsampled smoothly, read inside the part's silhouette (the background is faded), drawn in one hue
    whose opacity (up to `alpha`) follows the value, and its peak is ringed (`inspection.overlay`). `find_part`
    False draws over the whole frame (a bare map with no photo under it).
    """
    overlay, _, _ = render_overlay(image, heatmap, max_opacity=alpha, find_part=find_part)
    return overlay


class DecisionStore:
    """Thread-safe writer/reader of inspection decisions (see module docstring).

    `url_or_path`: a SQLAlchemy URL (``postgresql+psycopg://...``), a ``.sqlite`` file path, or a directory
    (then ``DIR/decisions.sqlite``). `media_dir` defaults to the SQLite file's directory; with a server URL it
    must be given.
    """

    def __init__(self, url_or_path: str | Path, media_dir: str | Path | None = None):
        url, sqlite_path = _as_url(url_or_path)
        if media_dir is None:
            if sqlite_path is None:
                raise DecisionStoreError(f"media_dir is required with a database URL ({url.split('@')[-1]})")
            media_dir = sqlite_path.parent
        self.media_dir = Path(media_dir)
        self.media_dir.mkdir(parents=True, exist_ok=True)
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if sqlite_path is not None:
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        # SQLite allows one writer; serialising writes here avoids busy retries under concurrent requests.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._outbox: tuple[str, Callable[[InspectionResult], str]] | None = None  # see enable_outbox
        _create_tables(self.engine)
        add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- media ---------------------------------------------------------------------------------------------

    def _save_image(self, data: bytes, sha256: str) -> str:
        ext = _EXTENSIONS.get(sniff_format(data) or "", "bin")
        rel = f"images/{sha256[:2]}/{sha256}.{ext}"
        path = self.media_dir / rel
        if not path.exists():  # content-addressed: identical bytes are stored once
            _atomic_write(path, data)
        return rel

    def _save_heatmap(self, request_id: str, heatmap: np.ndarray) -> str:
        heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
        if heat.ndim != 2 or heat.size == 0:
            raise DecisionStoreError(f"heatmap of {request_id} must be a non-empty 2-D map, got shape {heat.shape}")
        ok, buf = cv2.imencode(".png", np.round(heat * 65535.0).astype(np.uint16))
        if not ok:
            raise DecisionStoreError(f"could not encode the heatmap of {request_id}")
        rel = f"heatmaps/{request_id}.png"
        _atomic_write(self.media_dir / rel, buf.tobytes())
        return rel

    def load_heatmap(self, rel: str) -> np.ndarray:
        """The stored heatmap (h, w) as float32 in [0, 1]."""
        return _unit_map(cv2.imread(str(self.media_path(rel)), cv2.IMREAD_UNCHANGED), rel)

    def overlay_png(self, request_id: str) -> bytes | None:
        """PNG of the kept image with its heatmap laid over it (`heatmap_overlay`), or None when nothing was kept."""
        row = self.get_row(request_id)
        if not row or not row.get("heatmap_path"):
            return None
        path = self.media_path(row["heatmap_path"])
        stored = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if stored is not None and stored.ndim == 3:
            return path.read_bytes()  # an overlay written by a runner of an earlier release: already rendered
        heat = _unit_map(stored, row["heatmap_path"])
        image = None
        if row.get("image_path"):
            try:
                image = decode_image(self.media_path(row["image_path"]).read_bytes())
            except (InspectionError, OSError):
                image = None  # held for bad bytes: show the map alone
        find_part = image is not None
        if image is None:
            grey = (heat * 255).astype(np.uint8)
            image = cv2.cvtColor(cv2.resize(grey, (224, 224), interpolation=cv2.INTER_NEAREST), cv2.COLOR_GRAY2RGB)
        overlay = heatmap_overlay(image, heat, find_part=find_part)  # no photo: no silhouette to look for
        # fast compression: ~4x less CPU than the default level for ~5 % more bytes
        ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise DecisionStoreError(f"could not encode the heatmap overlay of {request_id}")
        return buf.tobytes()

    # -- writes --------------------------------------------------------------------------------------------

    def _row(
        self,
        result: InspectionResult,
        image_bytes: bytes | None,
        heatmap: np.ndarray | None,
        source: str,
    ) -> dict[str, Any]:
        if source not in SOURCES:
            raise DecisionStoreError(f"source {source!r} is not allowed; allowed: {SOURCES}")
        image_path = heatmap_path = None
        sha = result.image_sha256
        if image_bytes and sha is None:
            sha = hashlib.sha256(image_bytes).hexdigest()
        if result.verdict in KEEP_VERDICTS:
            # files first, row second: a row never points at a file that is not there
            if image_bytes:
                image_path = self._save_image(image_bytes, sha)
            if heatmap is not None:
                heatmap_path = self._save_heatmap(result.request_id, heatmap)
        th = result.thresholds
        return {
            "request_id": result.request_id,
            "part_id": result.part_id,
            "station": result.station,
            "timestamp": _utc(result.timestamp),
            "verdict": result.verdict.value,
            "defect_score": result.defect_score,
            "reject_threshold": th.reject if th else None,
            "review_threshold": th.review if th else None,
            "model_version": result.model_version,
            "latency_ms": result.latency_ms,
            "reason": result.reason,
            "image_sha256": sha,
            "image_path": image_path,
            "heatmap_path": heatmap_path,
            "source": source,
            "product": result.product,
            "defect_type": result.defect_type,
            "defect_type_probability": result.defect_type_probability,
        }

    def record_inspection(
        self,
        result: InspectionResult,
        image_bytes: bytes | None,
        heatmap: np.ndarray | None,
        source: str,
        *,
        folder_identity: tuple[str, str, str] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Store one decision (and, for review/reject parts, the image bytes and the raw heatmap) durably.

        `folder_identity` (identity, file name, destination) marks a dropped file as decided in the same
        transaction. Raises DecisionStoreError if the request id was already recorded. `timeout_s` bounds the
        wait for another writer's lock (StoreBusyError or sqlite's "database is locked" after it).
        """
        row = self._row(result, image_bytes, heatmap, source)
        try:
            with self._writing(timeout_s) as conn:
                conn.execute(insert(inspections), row)
                self._enqueue_outbox(conn, [result])
                if folder_identity is not None:
                    identity, name, destination = folder_identity
                    conn.execute(
                        insert(folder_files),
                        {
                            "identity": identity,
                            "file_name": name,
                            "request_id": result.request_id,
                            "destination": destination,
                            "emitted": 0,
                            "decided_at": datetime.now(UTC),
                        },
                    )
        except SAIntegrityError as exc:
            raise DecisionStoreError(f"decision {result.request_id} (or its folder file) is already recorded") from exc

    def record_many(
        self,
        decisions: Sequence[tuple[InspectionResult, bytes | None, np.ndarray | None, str]],
        timeout_s: float | None = None,
    ) -> None:
        """Store several decisions (result, image bytes, heatmap, source) in one transaction: all or none.

        The runner's micro-batch writes its parts together, so a batch pays for one commit instead of one each.
        `timeout_s`: as in `record_inspection`.
        """
        if not decisions:
            return
        rows = [self._row(result, data, heatmap, source) for result, data, heatmap, source in decisions]
        try:
            with self._writing(timeout_s) as conn:
                conn.execute(insert(inspections), rows)
                self._enqueue_outbox(conn, [d[0] for d in decisions])
        except SAIntegrityError as exc:
            ids = [r["request_id"] for r in rows]
            raise DecisionStoreError(f"one of the decisions {ids} is already recorded") from exc

    @contextlib.contextmanager
    def _writing(self, timeout_s: float | None = None):
        """One write transaction. SQLite has one writer at a time: this process's writers queue on a lock, and
        another process's (the review app's) transaction makes SQLite wait. With `timeout_s` both waits
        together are bounded by it (a line answer must not wait for a QA export); without it they wait up to
        BUSY_TIMEOUT_MS. Every write sets its own wait, so a bounded one never leaves a short wait behind."""
        t0 = time.monotonic()
        lock = self._write_lock
        if lock is not None and not lock.acquire(timeout=-1 if timeout_s is None else max(0.0, timeout_s)):
            raise StoreBusyError(f"the decision store was busy for {timeout_s:.2f} s (another write holds it)")
        try:
            with self.engine.begin() as conn:
                if self.is_sqlite:
                    wait_ms = BUSY_TIMEOUT_MS
                    if timeout_s is not None:
                        wait_ms = max(1, int((timeout_s - (time.monotonic() - t0)) * 1000))
                    conn.exec_driver_sql(f"PRAGMA busy_timeout={wait_ms}")
                yield conn
        finally:
            if lock is not None:
                lock.release()

    def mark_emitted(self, identity: str) -> None:
        with self._writing() as conn:
            conn.execute(update(folder_files).where(folder_files.c.identity == identity).values(emitted=1))

    # -- MQTT outbox (the rows of `outbox`; the relay is inspection/runner/outbox.py) -------------------------

    def enable_outbox(self, producer: str, topic_for: Callable[[InspectionResult], str]) -> None:
        """From now on every recorded decision also gets an outbox row (same transaction) for `producer`."""
        self._outbox = (producer, topic_for)

    def _enqueue_outbox(self, conn: Any, results: Sequence[InspectionResult]) -> None:
        if self._outbox is None or not results:
            return
        producer, topic_for = self._outbox
        now = datetime.now(UTC)
        conn.execute(
            insert(outbox),
            [
                {
                    "producer": producer,
                    "request_id": r.request_id,
                    "topic": topic_for(r),
                    "payload": r.model_dump_json(),
                    "created_at": now,
                }
                for r in results
            ],
        )

    def outbox_pending(self, producer: str, limit: int) -> list[dict[str, Any]]:
        """The oldest `limit` undelivered rows of `producer`, in the order they were decided."""
        query = select(outbox).where(outbox.c.producer == producer).order_by(outbox.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def outbox_delivered(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._writing() as conn:
            conn.execute(delete(outbox).where(outbox.c.id.in_(list(ids))))

    def outbox_count(self, producer: str) -> int:
        with self.engine.connect() as conn:
            query = select(func.count()).select_from(outbox).where(outbox.c.producer == producer)
            return int(conn.execute(query).scalar_one())

    def outbox_trim(self, producer: str, max_rows: int) -> int:
        """Drop the oldest rows of `producer` beyond `max_rows` (a broker gone for days must not fill the disk);
        returns how many were dropped."""
        with self._writing() as conn:
            keep_from = conn.execute(
                select(outbox.c.id)
                .where(outbox.c.producer == producer)
                .order_by(outbox.c.id.desc())
                .offset(max_rows - 1)
                .limit(1)
            ).scalar()
            if keep_from is None:
                return 0
            gone = conn.execute(delete(outbox).where(outbox.c.producer == producer, outbox.c.id < keep_from))
            return int(gone.rowcount or 0)

    # -- end of the MQTT outbox block ----------------------------------------------------------------------

    # -- reads ---------------------------------------------------------------------------------------------

    def folder_file(self, identity: str) -> dict[str, Any] | None:
        """The folder-mode record of a file identity, or None if it was never decided."""
        with self.engine.connect() as conn:
            row = conn.execute(select(folder_files).where(folder_files.c.identity == identity)).mappings().first()
        return dict(row) if row else None

    def get_row(self, request_id: str) -> dict[str, Any] | None:
        """The raw `inspections` row (with image and heatmap paths), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(inspections).where(inspections.c.request_id == request_id)).mappings().first()
        return dict(row) if row else None

    def get_inspection(self, request_id: str) -> InspectionResult | None:
        row = self.get_row(request_id)
        return None if row is None else result_from_row(row)

    def count_by_verdict(self) -> dict[str, int]:
        """verdict -> number of decisions (every verdict present, zero if none)."""
        counts = {v.value: 0 for v in Verdict}
        with self.engine.connect() as conn:
            for verdict, n in conn.execute(select(inspections.c.verdict, func.count()).group_by(inspections.c.verdict)):
                counts[verdict] = int(n)
        return counts

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(inspections)).scalar_one())

    def media_path(self, rel: str | None) -> Path | None:
        return None if rel is None else self.media_dir / rel


def result_from_row(row: dict[str, Any]) -> InspectionResult:
    thresholds = None
    if row["reject_threshold"] is not None and row["review_threshold"] is not None:
        thresholds = Thresholds(reject=row["reject_threshold"], review=row["review_threshold"])
    return InspectionResult(
        request_id=row["request_id"],
        part_id=row["part_id"],
        station=row["station"],
        timestamp=_utc(row["timestamp"]),
        verdict=Verdict(row["verdict"]),
        defect_score=row["defect_score"],
        thresholds=thresholds,
        model_version=row["model_version"],
        latency_ms=row["latency_ms"],
        reason=row["reason"],
        image_sha256=row["image_sha256"],
        product=row.get("product"),
        defect_type=row.get("defect_type"),
        defect_type_probability=row.get("defect_type_probability"),
    )


def _create_tables(engine: Engine, attempts: int = 3) -> None:
    """`metadata.create_all`, tolerating another process creating the same tables at the same moment (the runner
    and the review app starting together on a new PostgreSQL database: "relation already exists")."""
    for attempt in range(attempts):
        try:
            metadata.create_all(engine)
            return
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))  # the other creator's transaction commits; then everything is there


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns of our tables that an existing database lacks (created by an earlier release), so that
    opening an old store just works; returns "table.column" of each one added.

    Only nullable columns can be added this way (old rows read them as NULL), which is the rule for every column
    added after a table's first release. Two processes opening the same old store at once (runner and review app)
    may both try: the one that loses finds the column there and carries on.
    """
    added: list[str] = []
    existing = set(sa_inspect(engine).get_table_names())
    for table in metadata.sorted_tables:
        if table.name not in existing:  # just created by create_all, complete
            continue
        have = {c["name"] for c in sa_inspect(engine).get_columns(table.name)}
        missing = [c for c in table.columns if c.name not in have]
        for column in missing:
            if not column.nullable or column.primary_key:
                raise DecisionStoreError(
                    f"the database's table {table.name} lacks column {column.name}, which cannot be added to "
                    "existing rows (not nullable); migrate it by hand"
                )
            preparer = engine.dialect.identifier_preparer
            ddl = (
                f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {preparer.quote(column.name)} "
                f"{column.type.compile(dialect=engine.dialect)}"
            )
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(ddl)
            except DBAPIError:
                if column.name not in {c["name"] for c in sa_inspect(engine).get_columns(table.name)}:
                    raise
                continue  # another process added it meanwhile
            added.append(f"{table.name}.{column.name}")
        names = {c.name for c in missing}
        for index in table.indexes:
            if names & {c.name for c in index.columns}:
                try:
                    index.create(engine, checkfirst=True)
                except DBAPIError:
                    if index.name not in {i["name"] for i in sa_inspect(engine).get_indexes(table.name)}:
                        raise
    if added:
        where = engine.url.render_as_string(hide_password=True)
        logger.warning("decision store %s: added columns %s (a database of an earlier release)", where, added)
    return added


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (review app) never block the runner's writes
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; WAL keeps it consistent
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
