"""The queue of parts: repeated photos of one physical part collapse into one row, and a decision covers them all.

A line may photograph a part more than once (a re-shot after a bad frame, a burst of repeats, a second camera
pass) and each photo is its own inspection row. QA decides on parts, so the queue groups flagged photos that
share a part id and a station and were taken within `window_s` of the part's first photo. A part id seen again
after the window is a new part (ids are reused on some lines). `window_s` 0 keeps every photo on its own.

Decisions stay append-only rows per photo (`queries` owns the SQL and the replay rules): deciding a part appends
one row per photo, all with the same reviewer and `decided_at`, in one transaction; that shared stamp is what
"undo my last decision" undoes as one. Labels for training (`queries.reviewed_labels`) therefore come per photo
as before, every photo of a decided part carrying the part's label.

A part is waiting while any of its photos has no decision (a photo that arrived after the decision reopens it),
and decided once all have one. Counts count parts.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, tuple_

from inspection.decisions import DecisionStore, inspections
from inspection.review.queries import (
    _ANY,
    FLAGGED_VERDICTS,
    UNDO,
    QueueFilters,
    QueueItem,
    ReviewError,
    _decide_lock,
    _effective,
    _history,
    _queue_select,
    _utc,
    append_review,
    changed_message,
    checked_decision,
    in_effect_check,
    own_decisions,
    require_flagged,
    require_may_undo,
    row_fields,
    with_status,
)

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 600.0  # ReviewConfig.part_window_s
ANY = _ANY  # `seen` left out: decide on top of whatever is there
_VERDICT_RANK = {"reject": 2, "review": 1}


class PartConflict(ReviewError):
    """The part changed since the reviewer loaded it (a decision by someone else, or a new photo)."""


def _severity(photo: Photo) -> tuple[int, float]:
    """Reject before review, then the higher score: how the part's photos are ranked."""
    return _VERDICT_RANK.get(photo.verdict, 0), photo.defect_score or -1.0


@dataclass(frozen=True)
class Photo(QueueItem):
    """One flagged photo of a part, with its effective decision (the queue item's fields), and what the part's
    page shows besides."""

    review_threshold: float | None
    reject_threshold: float | None
    has_image: bool
    has_heatmap: bool
    decision_id: int | None
    predicted_type: str | None = None  # a typed model's most likely defect type (runner's answer)
    predicted_type_probability: float | None = None


@dataclass(frozen=True)
class Part:
    """One queue row: the photos of one physical part, oldest first. `request_id` (its first photo) names it."""

    photos: tuple[Photo, ...]

    @property
    def first(self) -> Photo:
        return self.photos[0]

    @property
    def request_id(self) -> str:
        return self.first.request_id

    @property
    def part_id(self) -> str:
        return self.first.part_id

    @property
    def station(self) -> str:
        return self.first.station

    @property
    def timestamp(self) -> datetime:
        return self.first.timestamp

    @property
    def last_timestamp(self) -> datetime:
        return self.photos[-1].timestamp

    @property
    def worst(self) -> Photo:
        """The photo the model is most sure is defective (reject before review, then the higher score)."""
        return max(self.photos, key=_severity)

    @property
    def verdict(self) -> str:
        return self.worst.verdict

    @property
    def defect_score(self) -> float | None:
        return self.worst.defect_score

    @property
    def model_version(self) -> str | None:
        return self.worst.model_version

    @property
    def reason(self) -> str | None:
        return self.worst.reason

    @property
    def n_waiting(self) -> int:
        return sum(p.decision_id is None for p in self.photos)

    @property
    def waiting(self) -> bool:
        return self.n_waiting > 0

    @property
    def decision(self) -> str | None:
        """The part's decision: the one action all its photos carry, None while any waits (or they disagree)."""
        actions = {p.decision for p in self.photos}
        return actions.pop() if len(actions) == 1 else None

    @property
    def defect_type(self) -> str | None:
        return self.photos[-1].defect_type if self.decision else None

    @property
    def typed_photo(self) -> Photo | None:
        """The photo whose model type stands for the part: the worst photo (the one behind the verdict), else the
        highest-scoring photo that has a type (a re-shot judged by a typed model); None when none has one."""
        if self.worst.predicted_type:
            return self.worst
        return max((p for p in self.photos if p.predicted_type), key=_severity, default=None)

    @property
    def predicted_type(self) -> str | None:
        """The model's defect type for the part (see `typed_photo`)."""
        photo = self.typed_photo
        return photo.predicted_type if photo else None

    @property
    def predicted_type_probability(self) -> float | None:
        photo = self.typed_photo
        return photo.predicted_type_probability if photo else None

    @property
    def reviewer(self) -> str | None:
        return self.photos[-1].reviewer if self.decision else None

    def seen(self) -> str:
        """What the reviewer saw, for the decision form: 'request_id:decision_id' per photo ('' if undecided)."""
        return ",".join(f"{p.request_id}:{p.decision_id if p.decision_id is not None else ''}" for p in self.photos)

    def sort_key(self) -> tuple[datetime, str]:
        return self.timestamp, self.request_id


def parse_seen(text: str) -> dict[str, int | None]:
    """The decision form's `seen` field back into {request_id: effective decision id or None}."""
    out: dict[str, int | None] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        rid, _, did = item.partition(":")
        try:
            out[rid] = int(did) if did else None
        except ValueError:
            raise ReviewError(f"seen: {item!r} is not 'request_id:decision_id'") from None
    return out


def _photo(row: Any) -> Photo:
    return Photo(
        **row_fields(row),
        review_threshold=row.review_threshold,
        reject_threshold=row.reject_threshold,
        has_image=bool(row.image_path),
        has_heatmap=bool(row.heatmap_path),
        decision_id=row.decision_id,
        predicted_type=row.defect_type,
        predicted_type_probability=row.defect_type_probability,
    )


def group_photos(photos: list[Photo], window_s: float) -> list[Part]:
    """Photos -> parts (see module docstring), ordered by first photo (timestamp, then request id)."""
    by_key: dict[tuple[str, str], list[Photo]] = {}
    for p in sorted(photos, key=lambda p: (p.timestamp, p.request_id)):
        by_key.setdefault((p.part_id, p.station), []).append(p)
    parts: list[Part] = []
    for series in by_key.values():
        current: list[Photo] = []
        for p in series:
            if current and (window_s <= 0 or (p.timestamp - current[0].timestamp).total_seconds() > window_s):
                parts.append(Part(tuple(current)))
                current = []
            current.append(p)
        parts.append(Part(tuple(current)))
    return sorted(parts, key=Part.sort_key)


def _matches(p: Photo, f: QueueFilters) -> bool:
    return (
        (not f.verdict or p.verdict == f.verdict)
        and (not f.station or p.station == f.station)
        and (not f.model_version or p.model_version == f.model_version)
        and (f.since is None or p.timestamp >= f.since)
        and (f.until is None or p.timestamp < f.until)
    )


def all_parts(store: DecisionStore, filters: QueueFilters, window_s: float) -> list[Part]:
    """Every part in the queue under `filters`: a part is in when one of its photos matches the filters and its
    status (waiting / decided) matches; it always comes with all its flagged photos."""
    # candidate parts: those with a matching photo of the right status (a waiting part has an undecided photo,
    # a decided one a decided photo), so months of decided history are not read for the waiting queue
    matching = _queue_select(filters)[0].subquery("matching")
    keys = select(matching.c.part_id, matching.c.station).distinct()
    every, _, _ = _queue_select(QueueFilters(status="all"))
    stmt = every.where(tuple_(inspections.c.part_id, inspections.c.station).in_(keys))
    with store.engine.connect() as conn:
        photos = [_photo(r) for r in conn.execute(stmt)]
    parts = [p for p in group_photos(photos, window_s) if any(_matches(ph, filters) for ph in p.photos)]
    if filters.status == "waiting":
        return [p for p in parts if p.waiting]
    if filters.status == "decided":
        return [p for p in parts if not p.waiting]
    return parts


def queue(
    store: DecisionStore, filters: QueueFilters, limit: int = 50, offset: int = 0, window_s: float = DEFAULT_WINDOW_S
) -> list[Part]:
    """Parts matching `filters`, oldest first photo first (ties by request id, so the order is stable)."""
    return all_parts(store, filters, window_s)[offset : offset + limit]


def count_queue(store: DecisionStore, filters: QueueFilters, window_s: float = DEFAULT_WINDOW_S) -> int:
    return len(all_parts(store, filters, window_s))


def count_waiting(store: DecisionStore, filters: QueueFilters | None = None, window_s: float = DEFAULT_WINDOW_S) -> int:
    """Parts nobody has decided yet (within the filters, whatever their status filter says)."""
    return count_queue(store, with_status(filters or QueueFilters(), "waiting"), window_s)


def part_of(store: DecisionStore, request_id: str, window_s: float = DEFAULT_WINDOW_S) -> Part | None:
    """The part one photo belongs to (all its flagged photos); a passed photo is a part of its own."""
    row = store.get_row(request_id)
    if row is None:
        return None
    if row["verdict"] not in FLAGGED_VERDICTS:
        every, _, _ = _queue_select(QueueFilters(status="all"), flagged_only=False)
        every = every.where(inspections.c.request_id == request_id)
    else:
        every, _, _ = _queue_select(QueueFilters(status="all"))
        every = every.where(inspections.c.part_id == row["part_id"], inspections.c.station == row["station"])
    with store.engine.connect() as conn:
        photos = [_photo(r) for r in conn.execute(every)]
    for part in group_photos(photos, window_s):
        if any(p.request_id == request_id for p in part.photos):
            return part
    return None


def neighbours(
    store: DecisionStore, request_id: str, filters: QueueFilters, window_s: float = DEFAULT_WINDOW_S
) -> tuple[str | None, str | None]:
    """(previous, next) part keys around the part of `request_id` in the filtered queue; the part itself need not
    match the filters any more (it was just decided): its first photo only places it."""
    part = part_of(store, request_id, window_s)
    if part is None:
        return None, None
    return neighbours_in(all_parts(store, filters, window_s), part)


def neighbours_in(listing: list[Part], part: Part) -> tuple[str | None, str | None]:
    """(previous, next) part keys around `part` in an already read queue `listing` (in queue order)."""
    key = part.sort_key()
    before = [p for p in listing if p.sort_key() < key]
    after = [p for p in listing if p.sort_key() > key]
    return (before[-1].request_id if before else None), (after[0].request_id if after else None)


def next_waiting(
    store: DecisionStore, after_request_id: str | None, filters: QueueFilters, window_s: float = DEFAULT_WINDOW_S
) -> str | None:
    """The waiting part to show after deciding `after_request_id`: the next one in queue order, else the oldest."""
    waiting = with_status(filters, "waiting")
    if after_request_id is not None:
        _, nxt = neighbours(store, after_request_id, waiting, window_s)
        if nxt is not None:
            return nxt
    first = queue(store, waiting, limit=1, window_s=window_s)
    return first[0].request_id if first else None


def history(store: DecisionStore, part: Part) -> list[dict[str, Any]]:
    """The part's audit trail: the review rows of all its photos, one entry per decision (rows that share a
    reviewer, action and time, i.e. one part decision, are one entry with `n_photos`), oldest first."""
    with store.engine.connect() as conn:
        rows = [(p.request_id, _history(conn, p.request_id)) for p in part.photos]
    current_ids = {p.decision_id for p in part.photos if p.decision_id is not None}
    entries: dict[tuple[Any, ...], dict[str, Any]] = {}
    by_id: dict[int, dict[str, Any]] = {}
    withdrawn: set[int] = set()
    for _, hist in rows:
        for h in hist:
            by_id[h["id"]] = h
            if h["action"] == UNDO and h["replaces"] is not None:
                withdrawn.add(h["replaces"])
    for _, hist in rows:
        for h in hist:
            key = (h["reviewer"], h["decided_at"], h["action"], h["defect_type"], h["comment"])
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = dict(h, n_photos=0, ids=[], is_current=False, undone=False)
                replaced = by_id.get(h["replaces"]) if h["replaces"] is not None else None
                entry["replaced"] = replaced
            entry["n_photos"] += 1
            entry["ids"].append(h["id"])
            entry["is_current"] = entry["is_current"] or h["id"] in current_ids
            entry["undone"] = entry["undone"] or h["id"] in withdrawn
    return sorted(entries.values(), key=lambda e: min(e["ids"]))


# -- writes --------------------------------------------------------------------------------------------------


def record_part_decision(
    store: DecisionStore,
    request_id: str,
    action: str,
    reviewer: str,
    defect_type: str | None = None,
    comment: str | None = None,
    seen: dict[str, int | None] | object = _ANY,
    now: datetime | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    extra_types: Collection[str] = (),
) -> list[int]:
    """Decide the part of `request_id`: one decision row per photo, same reviewer and time; returns their ids.

    `seen` is what the reviewer's page showed ({request_id: effective decision id or None}, `Part.seen`): if a
    photo was decided meanwhile, or a photo was added to the part, `PartConflict` is raised and nothing is
    written. Leave it out to decide on top of whatever is there. `defect_type`: one of `queries.allowed_types`
    (QA's enum, the types the store's models answer, `extra_types` such as the part's model card's).
    """
    defect_type, comment = checked_decision(store, action, defect_type, comment, extra_types)
    decided_at = _utc(now) if now else datetime.now(UTC)
    with _decide_lock:
        part = part_of(store, request_id, window_s)
        if part is None:
            raise ReviewError(f"no inspection with request id {request_id!r}")
        require_flagged(request_id, part.verdict)
        ids = [p.request_id for p in part.photos]
        with store.engine.begin() as conn:
            conn.execute(
                select(inspections.c.request_id).where(inspections.c.request_id.in_(ids)).with_for_update()
            ).all()
            current = {rid: _effective(_history(conn, rid)) for rid in ids}
            if seen is not _ANY:
                assert isinstance(seen, dict)
                if set(seen) != set(ids):
                    raise PartConflict(
                        f"part {part.part_id} now has {len(ids)} photo(s), the page showed {len(seen)}; reload it"
                    )
                for rid, c in current.items():
                    if seen[rid] != (c["id"] if c else None):
                        raise PartConflict(changed_message(part.part_id, c))
            new_ids = [
                append_review(conn, rid, action, reviewer, decided_at, c["id"] if c else None, defect_type, comment)
                for rid, c in current.items()  # in photo order
            ]
    logger.info("part %s (%d photos): %s by %s", part.part_id, len(ids), action, reviewer)
    return new_ids


def undo_part_decision(
    store: DecisionStore,
    reviewer: str,
    request_id: str | None = None,
    may_undo_others: bool = False,
    window_s: float = DEFAULT_WINDOW_S,
) -> str | None:
    """Withdraw a part decision by appending `undo` rows; returns a request id of the part, or None if nothing to undo.

    Without `request_id`: the reviewer's most recent decision still in effect, with every photo it was made on
    (the rows sharing its time). With it: the current decisions on every photo of that part, which must be the
    reviewer's own unless `may_undo_others` (admins).
    """
    with _decide_lock, store.engine.begin() as conn:
        targets: list[dict[str, Any]] = []
        if request_id is not None:
            part = part_of(store, request_id, window_s)
            ids = [p.request_id for p in part.photos] if part else [request_id]
            for rid in ids:
                current = _effective(_history(conn, rid))
                if current is None:
                    continue
                require_may_undo(current, reviewer, may_undo_others)
                targets.append(current)
        else:
            own = own_decisions(conn, reviewer, 500)
            in_effect = in_effect_check(conn)
            latest = next((c for row in own if (c := in_effect(row)) is not None), None)
            if latest is not None:
                stamp = _utc(latest["decided_at"])
                targets = [c for row in own if _utc(row.decided_at) == stamp and (c := in_effect(row)) is not None]
        if not targets:
            return None
        undone_at = datetime.now(UTC)
        for target in targets:
            append_review(conn, target["request_id"], UNDO, reviewer, undone_at, target["id"])
    first = min(targets, key=lambda t: t["id"])
    logger.info("%d decision row(s) from #%d undone by %s", len(targets), first["id"], reviewer)
    return str(first["request_id"])
