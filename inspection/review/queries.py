"""Review-side reads and writes on the decision store (SQLAlchemy Core, same SQL on SQLite and PostgreSQL).

The `reviews` table is append-only. A part's state is decided by its latest row:
- a decision row (`confirm_defect` / `override_ok`) is the part's current decision; its `replaces` names the
  decision it superseded (None if the part was undecided);
- an `undo` row withdraws the decision named in its `replaces`; the part returns to what that decision had
  replaced (an earlier decision, or undecided).
So the effective decision of a part is `latest.id` for a decision row and `undone.replaces` for an undo row.
Nothing is ever updated or deleted, so the whole history stays on the part's page as the audit trail.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Select, and_, case, func, insert, or_, select
from sqlalchemy.sql import Subquery

from inspection.decisions import DecisionStore, inspections, reviews
from inspection.errors import InspectionError
from inspection.schemas import DefectType, ReviewAction, Verdict

logger = logging.getLogger(__name__)

FLAGGED_VERDICTS = (Verdict.reject.value, Verdict.review.value)
DECISION_ACTIONS = (ReviewAction.confirm_defect.value, ReviewAction.override_ok.value)
UNDO = ReviewAction.undo.value
LABEL_OF_ACTION = {ReviewAction.confirm_defect.value: "defect", ReviewAction.override_ok.value: "ok"}
STATUSES = ("waiting", "decided", "all")
MAX_COMMENT = 2000  # same limit as schemas.ReviewDecision.comment

# One lock per process around "read current state, then append": a second reviewer's decision on the same part
# must be seen, never silently overwritten. PostgreSQL additionally locks the inspection row (FOR UPDATE).
_decide_lock = threading.Lock()


class ReviewError(InspectionError):
    """A review action cannot be done as asked (unknown part, bad action or defect type, ...)."""


class DecisionConflict(ReviewError):
    """The part's decision changed since the reviewer loaded the page; nothing was written."""

    def __init__(self, request_id: str, current: dict[str, Any] | None):
        super().__init__(changed_message(request_id, current))
        self.current = current


def changed_message(part: str, current: dict[str, Any] | None) -> str:
    """What a reviewer is told when part `part` was decided meanwhile; `current` is its decision now."""
    who = f"{current['action']} by {current['reviewer']}" if current else "undecided"
    return f"part {part} changed meanwhile (now: {who}); reload it and decide again"


@dataclass(frozen=True)
class QueueFilters:
    """What the queue shows. Empty strings / None mean 'any'."""

    station: str | None = None
    verdict: str | None = None  # 'reject' | 'review'
    model_version: str | None = None
    since: datetime | None = None  # inclusive, UTC
    until: datetime | None = None  # exclusive, UTC
    status: str = "waiting"  # 'waiting' (undecided) | 'decided' | 'all'

    def __post_init__(self) -> None:
        if self.verdict not in (None, *FLAGGED_VERDICTS):
            raise ReviewError(f"verdict filter {self.verdict!r} is not allowed; allowed: {', '.join(FLAGGED_VERDICTS)}")
        if self.status not in STATUSES:
            raise ReviewError(f"status filter {self.status!r} is not allowed; allowed: {', '.join(STATUSES)}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _utc(value))


@dataclass(frozen=True)
class QueueItem:
    """One flagged inspection (photo) with its effective decision."""

    request_id: str
    part_id: str
    station: str
    timestamp: datetime
    verdict: str
    defect_score: float | None
    model_version: str | None
    reason: str | None
    decision: str | None  # effective action, None if undecided
    defect_type: str | None  # the type QA gave with the effective decision
    reviewer: str | None


@dataclass
class PartDetail:
    row: dict[str, Any]  # the inspections row (timestamps UTC)
    current: dict[str, Any] | None  # effective decision row, None if undecided
    history: list[dict[str, Any]] = field(default_factory=list)  # every review row, oldest first, annotated


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def open_store(store: DecisionStore | str | Path, media_dir: str | Path | None = None) -> DecisionStore:
    return store if isinstance(store, DecisionStore) else DecisionStore(store, media_dir)


# -- the effective decision in SQL ---------------------------------------------------------------------------


def effective_subquery() -> Subquery:
    """request_id -> effective_id (None if undecided) and changed_at (time of the part's latest review row) for every
    part that has at least one review row."""
    last = select(reviews.c.request_id, func.max(reviews.c.id).label("last_id")).group_by(reviews.c.request_id)
    last = last.subquery("last")
    latest = reviews.alias("latest")
    undone = reviews.alias("undone")
    effective_id = case((latest.c.action == UNDO, undone.c.replaces), else_=latest.c.id).label("effective_id")
    return (
        select(last.c.request_id, effective_id, latest.c.decided_at.label("changed_at"))
        .select_from(last)
        .join(latest, latest.c.id == last.c.last_id)
        .outerjoin(undone, undone.c.id == latest.c.replaces)
        .subquery("eff")
    )


def _queue_select(filters: QueueFilters, flagged_only: bool = True) -> tuple[Select, Subquery, Any]:
    eff = effective_subquery()
    decision = reviews.alias("decision")
    stmt = (
        select(
            inspections,
            decision.c.id.label("decision_id"),
            decision.c.action.label("decision_action"),
            decision.c.defect_type.label("decision_defect_type"),
            decision.c.reviewer.label("decision_reviewer"),
        )
        .select_from(inspections)
        .outerjoin(eff, eff.c.request_id == inspections.c.request_id)
        .outerjoin(decision, decision.c.id == eff.c.effective_id)
        .where(*_filter_clauses(filters, flagged_only))
    )
    if filters.status == "waiting":
        stmt = stmt.where(decision.c.id.is_(None))
    elif filters.status == "decided":
        stmt = stmt.where(decision.c.id.is_not(None))
    return stmt, eff, decision


def _filter_clauses(filters: QueueFilters, flagged_only: bool = True) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [inspections.c.verdict.in_(FLAGGED_VERDICTS)] if flagged_only else []
    if filters.verdict:
        clauses.append(inspections.c.verdict == filters.verdict)
    if filters.station:
        clauses.append(inspections.c.station == filters.station)
    if filters.model_version:
        clauses.append(inspections.c.model_version == filters.model_version)
    if filters.since is not None:
        clauses.append(inspections.c.timestamp >= filters.since)
    if filters.until is not None:
        clauses.append(inspections.c.timestamp < filters.until)
    return clauses


def with_status(f: QueueFilters, status: str) -> QueueFilters:
    """The same filters with another status."""
    return QueueFilters(f.station, f.verdict, f.model_version, f.since, f.until, status=status)


def row_fields(row: Any) -> dict[str, Any]:
    """The fields of a `_queue_select` row that a queue item and a part's photo (`parts.Photo`) both carry."""
    return {
        "request_id": row.request_id,
        "part_id": row.part_id,
        "station": row.station,
        "timestamp": _utc(row.timestamp),
        "verdict": row.verdict,
        "defect_score": row.defect_score,
        "model_version": row.model_version,
        "reason": row.reason,
        "decision": row.decision_action,
        "defect_type": row.decision_defect_type,
        "reviewer": row.decision_reviewer,
    }


def _item(row: Any) -> QueueItem:
    return QueueItem(**row_fields(row))


def queue(store: DecisionStore, filters: QueueFilters, limit: int = 50, offset: int = 0) -> list[QueueItem]:
    """Flagged parts matching `filters`, oldest first (ties broken by request id, so the order is stable)."""
    stmt, _, _ = _queue_select(filters)
    stmt = stmt.order_by(inspections.c.timestamp, inspections.c.request_id).limit(limit).offset(offset)
    with store.engine.connect() as conn:
        return [_item(r) for r in conn.execute(stmt)]


def count_queue(store: DecisionStore, filters: QueueFilters) -> int:
    stmt, _, _ = _queue_select(filters)
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one())


def count_waiting(store: DecisionStore, filters: QueueFilters | None = None) -> int:
    """Flagged parts nobody has decided yet (within the filters, whatever their status filter says)."""
    return count_queue(store, with_status(filters or QueueFilters(), "waiting"))


def neighbours(store: DecisionStore, request_id: str, filters: QueueFilters) -> tuple[str | None, str | None]:
    """(previous, next) request ids around `request_id` in the filtered queue order; the part itself need not
    match the filters any more (it was just decided), its timestamp only places it."""
    row = store.get_row(request_id)
    if row is None:
        return None, None
    ts, rid = row["timestamp"], row["request_id"]
    ts_col, rid_col = inspections.c.timestamp, inspections.c.request_id
    stmt, _, _ = _queue_select(filters)
    after = stmt.where(or_(ts_col > ts, and_(ts_col == ts, rid_col > rid))).order_by(ts_col, rid_col).limit(1)
    before = (
        stmt.where(or_(ts_col < ts, and_(ts_col == ts, rid_col < rid))).order_by(ts_col.desc(), rid_col.desc()).limit(1)
    )
    with store.engine.connect() as conn:
        nxt = conn.execute(after).first()
        prv = conn.execute(before).first()
    return (prv.request_id if prv else None), (nxt.request_id if nxt else None)


def next_waiting(store: DecisionStore, after_request_id: str | None, filters: QueueFilters) -> str | None:
    """The waiting part to show after deciding `after_request_id`: the next one in queue order, else the oldest."""
    waiting = with_status(filters, "waiting")
    if after_request_id is not None:
        _, nxt = neighbours(store, after_request_id, waiting)
        if nxt is not None:
            return nxt
    first = queue(store, waiting, limit=1)
    return first[0].request_id if first else None


def filter_options(store: DecisionStore) -> dict[str, list[str]]:
    """Distinct stations and model versions among flagged parts, for the filter menus."""
    flagged = inspections.c.verdict.in_(FLAGGED_VERDICTS)
    with store.engine.connect() as conn:
        stations = conn.execute(select(inspections.c.station).where(flagged).distinct()).scalars().all()
        versions = conn.execute(
            select(inspections.c.model_version).where(flagged, inspections.c.model_version.is_not(None)).distinct()
        ).scalars()
        versions = list(versions)
    return {"stations": sorted(stations), "model_versions": sorted(versions)}


# -- one part ------------------------------------------------------------------------------------------------


def _review_dict(row: Any) -> dict[str, Any]:
    d = dict(row._mapping)
    d["decided_at"] = _utc(d["decided_at"])
    return d


def _history(conn: Any, request_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(select(reviews).where(reviews.c.request_id == request_id).order_by(reviews.c.id)).all()
    return [_review_dict(r) for r in rows]


def _effective(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Replay the append-only rows (see module docstring); returns the effective decision row or None."""
    by_id = {h["id"]: h for h in history}
    if not history:
        return None
    latest = history[-1]
    if latest["action"] != UNDO:
        return latest
    undone = by_id.get(latest["replaces"])
    if undone is None or undone["replaces"] is None:
        return None
    return by_id.get(undone["replaces"])


def part_detail(store: DecisionStore, request_id: str) -> PartDetail | None:
    """The inspection row, its effective decision and its whole review history (the audit trail)."""
    row = store.get_row(request_id)
    if row is None:
        return None
    row["timestamp"] = _utc(row["timestamp"])
    with store.engine.connect() as conn:
        history = _history(conn, request_id)
    current = _effective(history)
    by_id = {h["id"]: h for h in history}
    withdrawn = {h["replaces"] for h in history if h["action"] == UNDO}
    for h in history:
        h["is_current"] = current is not None and h["id"] == current["id"]
        h["undone"] = h["id"] in withdrawn
        h["replaced"] = by_id.get(h["replaces"]) if h["replaces"] is not None else None
    return PartDetail(row=row, current=current, history=history)


# -- writes --------------------------------------------------------------------------------------------------


ENUM_TYPES = tuple(d.value for d in DefectType)  # QA's fixed vocabulary, offered beside the models' own types


def known_types(conn: Any) -> list[str]:
    """Every defect type the store has seen: predicted by a model (`inspections.defect_type`: a typed model's
    own names, e.g. a plant's folder types) or confirmed by QA; sorted."""
    predicted = select(inspections.c.defect_type).where(inspections.c.defect_type.is_not(None)).distinct()
    confirmed = select(reviews.c.defect_type).where(reviews.c.defect_type.is_not(None)).distinct()
    return sorted(set(conn.execute(predicted).scalars()) | set(conn.execute(confirmed).scalars()))


def allowed_types(conn: Any, extra: Collection[str] = ()) -> list[str]:
    """The types a decision may carry: QA's enum, the store's known types, and `extra` (a model card's types)."""
    return sorted(set(ENUM_TYPES) | set(known_types(conn)) | set(extra))


def _validate_decision(
    action: str, defect_type: str | None, comment: str | None, allowed: Collection[str] = ENUM_TYPES
) -> tuple[str | None, str | None]:
    if action not in DECISION_ACTIONS:
        raise ReviewError(f"action {action!r} is not allowed; allowed: {', '.join(DECISION_ACTIONS)}")
    defect_type = defect_type or None
    if defect_type is not None and defect_type not in allowed:
        raise ReviewError(f"defect type {defect_type!r} is not allowed; allowed: {', '.join(sorted(allowed))}")
    comment = (comment or "").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT:
        raise ReviewError(f"comment has {len(comment)} characters, at most {MAX_COMMENT} are allowed")
    return defect_type, comment


def checked_decision(
    store: DecisionStore, action: str, defect_type: str | None, comment: str | None, extra_types: Collection[str]
) -> tuple[str | None, str | None]:
    """`_validate_decision` against the types the store allows (`allowed_types`; QA's enum when no type is given)."""
    if defect_type:
        with store.engine.connect() as conn:
            allowed = allowed_types(conn, extra_types)
    else:
        allowed = ENUM_TYPES
    return _validate_decision(action, defect_type, comment, allowed)


def require_flagged(request_id: str, verdict: str) -> None:
    """Only flagged parts are reviewed."""
    if verdict not in FLAGGED_VERDICTS:
        raise ReviewError(
            f"part {request_id} has verdict {verdict!r}; only {', '.join(FLAGGED_VERDICTS)} parts are reviewed"
        )


def require_may_undo(current: dict[str, Any], reviewer: str, may_undo_others: bool) -> None:
    """A decision is undone by whoever made it, or by an admin (`may_undo_others`)."""
    if current["reviewer"] != reviewer and not may_undo_others:
        raise ReviewError(
            f"the decision on {current['request_id']} was made by {current['reviewer']}; "
            "only they or an admin can undo it"
        )


def append_review(
    conn: Any,
    request_id: str,
    action: str,
    reviewer: str,
    decided_at: datetime,
    replaces: int | None,
    defect_type: str | None = None,
    comment: str | None = None,
) -> int:
    """Append one review row (a decision, or an `undo` naming the decision it withdraws); returns its id."""
    result = conn.execute(
        insert(reviews).returning(reviews.c.id),
        {
            "request_id": request_id,
            "action": action,
            "defect_type": defect_type,
            "comment": comment,
            "reviewer": reviewer,
            "decided_at": decided_at,
            "replaces": replaces,
        },
    )
    return int(result.scalar_one())


def own_decisions(conn: Any, reviewer: str, limit: int) -> list[Any]:
    """The reviewer's decision rows, newest first, at most `limit`."""
    return conn.execute(
        select(reviews)
        .where(reviews.c.reviewer == reviewer, reviews.c.action.in_(DECISION_ACTIONS))
        .order_by(reviews.c.id.desc())
        .limit(limit)
    ).all()


def in_effect_check(conn: Any) -> Callable[[Any], dict[str, Any] | None]:
    """A function of a review row: its effective decision if that is the row itself (not since replaced or
    undone), else None; each request id's history is replayed once."""
    effective: dict[str, dict[str, Any] | None] = {}

    def in_effect(row: Any) -> dict[str, Any] | None:
        if row.request_id not in effective:
            effective[row.request_id] = _effective(_history(conn, row.request_id))
        current = effective[row.request_id]
        return current if current is not None and current["id"] == row.id else None

    return in_effect


_ANY = object()


def record_decision(
    store: DecisionStore,
    request_id: str,
    action: str,
    reviewer: str,
    defect_type: str | None = None,
    comment: str | None = None,
    expected_current: int | None | object = _ANY,
    now: datetime | None = None,
    extra_types: Collection[str] = (),
) -> int:
    """Append a decision on a flagged part; returns its id.

    `expected_current` is the effective decision id the reviewer saw (None = undecided). If the part changed
    since, `DecisionConflict` is raised and nothing is written. Leave it out to decide on top of whatever is there.
    `defect_type` is one of `allowed_types` (QA's enum, the types models in the store answer, `extra_types`).
    """
    defect_type, comment = checked_decision(store, action, defect_type, comment, extra_types)
    with _decide_lock, store.engine.begin() as conn:
        part = conn.execute(
            select(inspections.c.request_id, inspections.c.verdict)
            .where(inspections.c.request_id == request_id)
            .with_for_update()
        ).first()
        if part is None:
            raise ReviewError(f"no inspection with request id {request_id!r}")
        require_flagged(request_id, part.verdict)
        current = _effective(_history(conn, request_id))
        current_id = current["id"] if current else None
        if expected_current is not _ANY and expected_current != current_id:
            raise DecisionConflict(request_id, current)
        decided_at = _utc(now) if now else datetime.now(UTC)
        new_id = append_review(conn, request_id, action, reviewer, decided_at, current_id, defect_type, comment)
    logger.info("review #%d: %s %s by %s (replaces %s)", new_id, request_id, action, reviewer, current_id)
    return new_id


def undo_decision(
    store: DecisionStore, reviewer: str, request_id: str | None = None, may_undo_others: bool = False
) -> str | None:
    """Withdraw a decision by appending an `undo` row; returns the part's request id, or None if nothing to undo.

    Without `request_id`: the reviewer's most recent decision that is still in effect. With it: that part's
    current decision, which must be the reviewer's own unless `may_undo_others` (admins).
    """
    with _decide_lock, store.engine.begin() as conn:
        target: dict[str, Any] | None = None
        if request_id is not None:
            current = _effective(_history(conn, request_id))
            if current is None:
                return None
            require_may_undo(current, reviewer, may_undo_others)
            target = current
        else:
            # newest first; a decision of ours that was since replaced or undone is skipped
            in_effect = in_effect_check(conn)
            target = next((c for row in own_decisions(conn, reviewer, 200) if (c := in_effect(row)) is not None), None)
        if target is None:
            return None
        append_review(conn, target["request_id"], UNDO, reviewer, datetime.now(UTC), target["id"])
    logger.info("review #%d on %s undone by %s", target["id"], target["request_id"], reviewer)
    return str(target["request_id"])


# -- feedback to training ------------------------------------------------------------------------------------


class ReviewedLabel(NamedTuple):
    """One image's QA label (see `reviewed_labels`)."""

    sha256: str
    image_path: str | None  # absolute; None when the image was not kept
    label: str  # 'defect' | 'ok'
    reviewer: str
    decided_at: datetime
    defect_type: str | None  # QA's confirmed type of a defect; None: no type given (always None for 'ok')

    def for_manifest(self) -> tuple[str, str, str, datetime, str | None]:
        """The tuple `inspection.ingest.apply_review_labels` takes."""
        return self.sha256, self.label, self.reviewer, self.decided_at, self.defect_type


def reviewed_labels(store: DecisionStore | str | Path, media_dir: str | Path | None = None) -> list[ReviewedLabel]:
    """Labels from QA decisions, for `inspection.ingest.apply_review_labels` and `inspection review export`.

    Returns `ReviewedLabel(image_sha256, image_path, label, reviewer, decided_at, defect_type)` per image, label
    'defect' (confirm_defect, with the type QA confirmed, if any) or 'ok' (override_ok, never a type), from each
    part's effective decision (undone decisions do not count); `reviewer` is who
    made that decision. `decided_at` is when the label took effect: the time of the part's latest review row, so
    that after an undo brings back an earlier decision, its label is newer than the withdrawn one (consumers such
    as `apply_review_labels` keep the latest label per image). `image_path` is absolute (None when the image was
    not kept). Parts without an image hash are skipped. When the same image was inspected more than once, the
    latest label wins. Sorted by decided_at, then sha256.
    """
    st = open_store(store, media_dir)
    eff = effective_subquery()
    decision = reviews.alias("decision")
    stmt = (
        select(
            inspections.c.image_sha256,
            inspections.c.image_path,
            decision.c.action,
            decision.c.reviewer,
            eff.c.changed_at,
            decision.c.id,
            decision.c.defect_type,
        )
        .select_from(inspections)
        .join(eff, eff.c.request_id == inspections.c.request_id)
        .join(decision, decision.c.id == eff.c.effective_id)
        .where(inspections.c.image_sha256.is_not(None), decision.c.action.in_(DECISION_ACTIONS))
        .order_by(eff.c.changed_at, decision.c.id)
    )
    latest: dict[str, ReviewedLabel] = {}
    with st.engine.connect() as conn:
        for sha, rel, action, reviewer, changed_at, _, kind in conn.execute(stmt):
            path = str((st.media_dir / rel).resolve()) if rel else None
            label = LABEL_OF_ACTION[action]
            kind = kind if label == "defect" else None  # a type picked before pressing "Override: OK" means nothing
            latest[sha] = ReviewedLabel(sha, path, label, reviewer, _utc(changed_at), kind)  # type: ignore[arg-type]
    return sorted(latest.values(), key=lambda t: (t[4], t[0]))


def withdrawn_labels(
    store: DecisionStore | str | Path, media_dir: str | Path | None = None
) -> list[tuple[str, datetime]]:
    """`(image_sha256, withdrawn_at)` of images that had a QA label which was undone, leaving no decision.

    `reviewed_labels` no longer lists them; a consumer that already applied their old label can drop it.
    Images that still carry a label through another inspection of the same image are not listed.
    """
    st = open_store(store, media_dir)
    eff = effective_subquery()
    stmt = (
        select(inspections.c.image_sha256, eff.c.effective_id, eff.c.changed_at)
        .select_from(inspections)
        .join(eff, eff.c.request_id == inspections.c.request_id)
        .where(inspections.c.image_sha256.is_not(None))
    )
    labelled: set[str] = set()
    withdrawn: dict[str, datetime] = {}
    with st.engine.connect() as conn:
        for sha, effective_id, changed_at in conn.execute(stmt):
            if effective_id is not None:
                labelled.add(sha)
            else:
                at = _utc(changed_at)
                withdrawn[sha] = max(withdrawn.get(sha, at), at)  # type: ignore[type-var]
    return sorted(((sha, at) for sha, at in withdrawn.items() if sha not in labelled), key=lambda t: (t[1], t[0]))
