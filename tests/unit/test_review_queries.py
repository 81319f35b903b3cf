"""Review-side queries: queue order and filters, append-only decisions, undo, conflicts, reviewed labels, stats."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from inspection.decisions import DecisionStore, reviews
from inspection.images import encode_png
from inspection.review import queries as q
from inspection.review.demo import DEMO_THRESHOLDS, seed_store
from inspection.review.stats import compute_stats, flagged_chart_svg, hbar_chart_svg, stats_summary
from inspection.schemas import InspectionResult, Verdict

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path):
    st = DecisionStore(tmp_path / "store")
    yield st
    st.close()


@pytest.fixture
def seeded(store: DecisionStore):
    parts = seed_store(store, n=6, n_pass=3, seed=1, now=NOW)
    return store, [p for p in parts if p.verdict != "pass"]


def _record(store: DecisionStore, rid: str, verdict: Verdict, ts: datetime, image: bytes | None, **kw) -> None:
    result = InspectionResult(
        request_id=rid,
        part_id=kw.get("part_id", rid),
        station=kw.get("station", "line-9"),
        timestamp=ts,
        verdict=verdict,
        defect_score=kw.get("score", 0.9),
        thresholds=DEMO_THRESHOLDS,
        model_version=kw.get("model_version", "v9"),
        latency_ms=5.0,
        reason=kw.get("reason"),
    )
    store.record_inspection(result, image, np.zeros((4, 4), np.float32) if image else None, "http")


def test_queue_is_flagged_parts_oldest_first_with_count(seeded) -> None:
    store, flagged = seeded
    items = q.queue(store, q.QueueFilters())
    assert [i.request_id for i in items] == [p.request_id for p in flagged]
    assert all(i.verdict in ("reject", "review") for i in items)
    assert [i.timestamp for i in items] == sorted(i.timestamp for i in items)
    assert q.count_waiting(store) == 6
    assert q.count_queue(store, q.QueueFilters(status="all")) == 6  # passed parts never enter the queue


def test_queue_filters(seeded) -> None:
    store, flagged = seeded
    for station in ("line-1", "line-2"):
        got = {i.request_id for i in q.queue(store, q.QueueFilters(station=station))}
        assert got == {p.request_id for p in flagged if p.station == station}
    for verdict in ("reject", "review"):
        got = {i.request_id for i in q.queue(store, q.QueueFilters(verdict=verdict))}
        assert got == {p.request_id for p in flagged if p.verdict == verdict}
    got = {i.request_id for i in q.queue(store, q.QueueFilters(model_version="v0002"))}
    assert got == {p.request_id for p in flagged if p.model_version == "v0002"}
    middle = flagged[2].timestamp
    since = {i.request_id for i in q.queue(store, q.QueueFilters(since=middle))}
    until = {i.request_id for i in q.queue(store, q.QueueFilters(until=middle))}
    assert since == {p.request_id for p in flagged[2:]}
    assert until == {p.request_id for p in flagged[:2]}
    assert q.filter_options(store) == {"stations": ["line-1", "line-2"], "model_versions": ["v0001", "v0002"]}
    with pytest.raises(q.ReviewError, match="allowed: reject, review"):
        q.QueueFilters(verdict="pass")
    with pytest.raises(q.ReviewError, match="status filter"):
        q.QueueFilters(status="later")


def test_decisions_leave_the_waiting_queue_and_are_append_only(seeded) -> None:
    store, flagged = seeded
    a, b = flagged[0].request_id, flagged[1].request_id
    first = q.record_decision(
        store, a, "confirm_defect", "ann", defect_type="crack", comment=" hairline ", expected_current=None
    )
    assert q.count_waiting(store) == 5
    assert a not in {i.request_id for i in q.queue(store, q.QueueFilters())}
    decided = q.queue(store, q.QueueFilters(status="decided"))
    assert [(i.request_id, i.decision, i.defect_type, i.reviewer) for i in decided] == [
        (a, "confirm_defect", "crack", "ann")
    ]
    second = q.record_decision(store, a, "override_ok", "bob", expected_current=first)
    detail = q.part_detail(store, a)
    assert detail is not None
    assert detail.current["id"] == second and detail.current["replaces"] == first
    assert [h["comment"] for h in detail.history] == ["hairline", None]  # stripped, kept
    assert detail.history[1]["replaced"]["id"] == first
    # the part is still decided once, and nothing was rewritten
    assert q.count_waiting(store) == 5
    q.record_decision(store, b, "override_ok", "ann")
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(reviews)).scalar_one() == 3


def test_stale_decision_is_refused_not_overwritten(seeded) -> None:
    store, flagged = seeded
    rid = flagged[0].request_id
    mine = q.record_decision(store, rid, "confirm_defect", "ann", expected_current=None)
    with pytest.raises(q.DecisionConflict, match="confirm_defect by ann"):
        q.record_decision(store, rid, "override_ok", "bob", expected_current=None)  # bob's page was stale
    assert q.part_detail(store, rid).current["id"] == mine


def test_bad_decisions_are_refused_with_what_is_allowed(seeded, store) -> None:
    _, flagged = seeded
    rid = flagged[0].request_id
    with pytest.raises(q.ReviewError, match="allowed: confirm_defect, override_ok"):
        q.record_decision(store, rid, "undo", "ann")
    with pytest.raises(q.ReviewError, match="defect type 'dent'.*blowhole"):
        q.record_decision(store, rid, "confirm_defect", "ann", defect_type="dent")
    with pytest.raises(q.ReviewError, match="at most 2000"):
        q.record_decision(store, rid, "confirm_defect", "ann", comment="x" * 2001)
    with pytest.raises(q.ReviewError, match="no inspection"):
        q.record_decision(store, "nope", "confirm_defect", "ann")
    _record(store, "passed-1", Verdict.pass_, NOW, None)
    with pytest.raises(q.ReviewError, match="only reject, review parts"):
        q.record_decision(store, "passed-1", "confirm_defect", "ann")
    assert q.count_waiting(store) == 6


def test_undo_restores_the_previous_state_by_appending(seeded) -> None:
    store, flagged = seeded
    a, b = flagged[0].request_id, flagged[1].request_id
    d1 = q.record_decision(store, a, "confirm_defect", "ann", defect_type="blowhole")
    d2 = q.record_decision(store, a, "override_ok", "ann")
    q.record_decision(store, b, "override_ok", "bob")
    assert q.undo_decision(store, "ann") == a  # ann's last decision still in effect: d2 on a
    assert q.part_detail(store, a).current["id"] == d1  # back to what d2 replaced
    assert q.undo_decision(store, "ann") == a
    assert q.part_detail(store, a).current is None  # undecided again
    assert q.undo_decision(store, "ann") is None  # nothing of ann's left; bob's decision is not hers
    assert q.part_detail(store, b).current is not None
    history = q.part_detail(store, a).history
    assert [h["action"] for h in history] == ["confirm_defect", "override_ok", "undo", "undo"]
    assert [h["replaces"] for h in history] == [None, d1, d2, d1]
    assert q.count_waiting(store) == 5


def test_undo_of_someone_elses_decision_needs_admin(seeded) -> None:
    store, flagged = seeded
    rid = flagged[0].request_id
    q.record_decision(store, rid, "confirm_defect", "ann")
    with pytest.raises(q.ReviewError, match="made by ann"):
        q.undo_decision(store, "bob", request_id=rid)
    assert q.undo_decision(store, "boss", request_id=rid, may_undo_others=True) == rid
    assert q.part_detail(store, rid).current is None


def test_neighbours_and_next_waiting_follow_the_filtered_order(seeded) -> None:
    store, flagged = seeded
    ids = [p.request_id for p in flagged]
    f = q.QueueFilters()
    assert q.neighbours(store, ids[0], f) == (None, ids[1])
    assert q.neighbours(store, ids[3], f) == (ids[2], ids[4])
    q.record_decision(store, ids[1], "override_ok", "ann")
    assert q.neighbours(store, ids[1], f) == (ids[0], ids[2])  # a decided part still has its place
    assert q.neighbours(store, ids[0], f) == (None, ids[2])  # decided parts are skipped
    assert q.next_waiting(store, ids[5], f) == ids[0]  # at the end: back to the oldest waiting
    line2 = q.QueueFilters(station="line-2")
    assert q.next_waiting(store, ids[1], line2) == ids[3]


def test_reviewed_labels_use_the_effective_decision(seeded, store: DecisionStore) -> None:
    _, flagged = seeded
    ids = [p.request_id for p in flagged]
    t0 = NOW + timedelta(hours=1)
    q.record_decision(store, ids[0], "confirm_defect", "ann", now=t0)
    q.record_decision(store, ids[1], "override_ok", "bob", now=t0 + timedelta(minutes=1))
    q.record_decision(store, ids[2], "confirm_defect", "ann", now=t0 + timedelta(minutes=2))
    q.record_decision(store, ids[2], "override_ok", "cat", now=t0 + timedelta(minutes=3))  # replaces ann's
    q.record_decision(store, ids[3], "confirm_defect", "ann", now=t0 + timedelta(minutes=4))
    q.undo_decision(store, "ann", request_id=ids[3])  # withdrawn: no label
    labels = q.reviewed_labels(store)
    sha = {rid: store.get_row(rid)["image_sha256"] for rid in ids}
    assert [(s, label, who) for s, _, label, who, _, _ in labels] == [
        (sha[ids[0]], "defect", "ann"),
        (sha[ids[1]], "ok", "bob"),
        (sha[ids[2]], "ok", "cat"),
    ]
    for s, path, _, _, decided_at, _ in labels:
        assert Path(path).is_absolute() and Path(path).is_file() and s in path
        assert decided_at.tzinfo is not None
    # the same call works on the store's path (as the flows will call it)
    assert q.reviewed_labels(store.media_dir) == labels


def test_reviewed_labels_same_image_twice_latest_wins_and_no_image_is_skipped(store: DecisionStore) -> None:
    png = encode_png(np.full((40, 40, 3), 120, np.uint8))
    _record(store, "r1", Verdict.reject, NOW, png)
    _record(store, "r2", Verdict.review, NOW + timedelta(minutes=5), png)  # same part photographed again
    _record(store, "r3", Verdict.review, NOW, None, reason="corrupt image")  # held without an image
    q.record_decision(store, "r2", "override_ok", "bob", now=NOW + timedelta(hours=1))
    q.record_decision(store, "r1", "confirm_defect", "ann", now=NOW + timedelta(hours=2))
    q.record_decision(store, "r3", "confirm_defect", "ann", now=NOW + timedelta(hours=3))
    labels = q.reviewed_labels(store)
    assert len(labels) == 1
    assert labels[0][2:4] == ("defect", "ann")


def test_stats_counts_rates_and_hourly_bins(seeded) -> None:
    store, flagged = seeded
    ids = [p.request_id for p in flagged]
    q.record_decision(store, ids[0], "confirm_defect", "ann", defect_type="crack")
    q.record_decision(store, ids[1], "confirm_defect", "ann")
    q.record_decision(store, ids[2], "override_ok", "ann")
    q.record_decision(store, ids[3], "override_ok", "ann")
    q.undo_decision(store, "ann")  # withdraws ids[3]
    s = compute_stats(store, NOW - timedelta(hours=3), NOW)
    assert (s.inspected, s.flagged, s.decided, s.confirmed, s.overridden, s.waiting) == (9, 6, 3, 2, 1, 3)
    assert s.override_rate == pytest.approx(1 / 3)
    assert s.defects_by_type["crack"] == 1 and s.defects_by_type["unspecified"] == 1
    assert sum(s.defects_by_type.values()) == 2
    assert len(s.flagged_bins) == 3 and s.bin_hours == 1
    assert sum(rej + rev for _, rej, rev in s.flagged_bins) == 6
    assert sum(rej for _, rej, _ in s.flagged_bins) == sum(p.verdict == "reject" for p in flagged)
    per = {v.model_version: v for v in s.per_version}
    assert sum(v.flagged for v in per.values()) == 6 and sum(v.decided for v in per.values()) == 3
    by_version: dict[str, int] = {}
    for p in flagged:
        by_version[p.model_version] = by_version.get(p.model_version, 0) + 1
    assert {k: v.flagged for k, v in per.items()} == by_version
    # a period before anything happened is empty, and long periods bin by day
    empty = compute_stats(store, NOW - timedelta(days=90), NOW - timedelta(days=30))
    assert (empty.inspected, empty.override_rate, empty.bin_hours) == (0, None, 24)
    assert stats_summary(s)["override_rate"] == pytest.approx(1 / 3)


def test_charts_are_svg_with_escaped_labels(seeded) -> None:
    store, _ = seeded
    s = compute_stats(store, NOW - timedelta(hours=3), NOW)
    svg = str(flagged_chart_svg(s))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<rect") == sum((rej > 0) + (rev > 0) for _, rej, rev in s.flagged_bins)
    bars = str(hbar_chart_svg([("<script>x</script>", 3.0), ("crack", 1.0)]))
    assert "<script>" not in bars and "&lt;script&gt;" in bars


def test_labels_after_an_undo_are_newer_than_the_withdrawn_one(seeded) -> None:
    """An undo that brings back an earlier decision must win over the withdrawn label downstream, where the
    latest label per image is kept (ingest.apply_review_labels); an undo back to undecided is reported apart."""
    store, flagged = seeded
    a, b = flagged[0].request_id, flagged[1].request_id
    t0 = NOW + timedelta(hours=1)
    q.record_decision(store, a, "confirm_defect", "ann", now=t0)
    q.record_decision(store, a, "override_ok", "bob", now=t0 + timedelta(minutes=1))
    withdrawn_label = q.reviewed_labels(store)[0]
    assert withdrawn_label[2:4] == ("ok", "bob")
    q.undo_decision(store, "bob", request_id=a)
    (label,) = q.reviewed_labels(store)
    assert label[2:4] == ("defect", "ann")
    assert label[4] > withdrawn_label[4]
    assert q.withdrawn_labels(store) == []
    q.record_decision(store, b, "confirm_defect", "ann", now=t0)
    q.undo_decision(store, "ann", request_id=b)
    sha_b = store.get_row(b)["image_sha256"]
    assert [sha for sha, _ in q.withdrawn_labels(store)] == [sha_b]
    assert sha_b not in {sha for sha, *_ in q.reviewed_labels(store)}


def test_reviewed_labels_feed_ingest_apply_review_labels(tmp_path: Path, store: DecisionStore) -> None:
    """The shape `reviewed_labels` returns is what `inspection.ingest.apply_review_labels` takes (minus the path):
    a QA decision on a line photo relabels the same image in the training manifest."""
    from inspection.ingest import IngestConfig, apply_review_labels, load_samples, run_ingest
    from inspection.synth import render_part

    raw = tmp_path / "raw" / "ok_front"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(7)
    photos = []
    for i in range(4):
        data = encode_png(render_part(rng, defect=False, size=96)[0])
        (raw / f"part{i}.png").write_bytes(data)
        photos.append(data)
    ingest_store = tmp_path / "ingest"
    run_ingest(IngestConfig(), [tmp_path / "raw"], ingest_store)
    for i, data in enumerate(photos[:2]):  # the line saw two of them and flagged them
        _record(store, f"line-{i}", Verdict.reject, NOW + timedelta(minutes=i), data)
    q.record_decision(store, "line-0", "confirm_defect", "ann", defect_type="crack")
    q.record_decision(store, "line-1", "override_ok", "ann")
    labels = q.reviewed_labels(store)
    apply_review_labels(ingest_store, [label.for_manifest() for label in labels])
    by_sha = {s.sha256: s.label for s in load_samples(ingest_store)}
    sha0, sha1 = store.get_row("line-0")["image_sha256"], store.get_row("line-1")["image_sha256"]
    assert by_sha[sha0] == "defect"  # the reviewer's label beats the folder's 'ok'
    assert by_sha[sha1] == "ok"
    assert sum(label == "ok" for label in by_sha.values()) == 3

    # a changed mind, applied, then undone: the earlier label comes back downstream too
    def apply() -> dict[str, str | None]:
        labels = q.reviewed_labels(store)
        apply_review_labels(ingest_store, [label.for_manifest() for label in labels])
        return {s.sha256: s.label for s in load_samples(ingest_store)}

    q.record_decision(store, "line-0", "override_ok", "bob")
    assert apply()[sha0] == "ok"
    q.undo_decision(store, "bob", request_id="line-0")
    assert apply()[sha0] == "defect"
