"""The queue of parts: repeated photos of one part collapse into one row, a decision covers every photo of it,
the counts count parts, undo withdraws the whole decision; and the same through the web app."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from inspection.decisions import DecisionStore, reviews
from inspection.images import encode_png
from inspection.review import ReviewConfig, create_app
from inspection.review import parts as P
from inspection.review import queries as q
from inspection.review.demo import DEMO_THRESHOLDS
from inspection.schemas import InspectionResult, Verdict
from inspection.synth import render_part

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"


@pytest.fixture
def store(tmp_path: Path):
    st = DecisionStore(tmp_path / "store")
    yield st
    st.close()


_IMAGE = encode_png(render_part(np.random.default_rng(0), True, 96)[0])


def _shot(store: DecisionStore, rid: str, part_id: str, minutes: float, **kw) -> None:
    """One photo of `part_id`, `minutes` after NOW."""
    verdict = kw.get("verdict", Verdict.reject)
    result = InspectionResult(
        request_id=rid,
        part_id=part_id,
        station=kw.get("station", "line-1"),
        timestamp=NOW + timedelta(minutes=minutes),
        verdict=verdict,
        defect_score=kw.get("score", 0.9 if verdict == Verdict.reject else 0.5 if verdict == Verdict.review else 0.1),
        thresholds=DEMO_THRESHOLDS,
        model_version=kw.get("model_version", "v1"),
        latency_ms=5.0,
    )
    store.record_inspection(result, _IMAGE, np.zeros((7, 7), np.float32), "http")


@pytest.fixture
def line(store: DecisionStore) -> DecisionStore:
    """A: three photos within 4 min (a burst); B: one photo; A again 30 min later (a new part, same id);
    C: one photo at another station with A's id; D: a passed photo (never in the queue)."""
    _shot(store, "a1", "A", 0, verdict=Verdict.review, score=0.4)
    _shot(store, "a2", "A", 2, score=0.95)
    _shot(store, "b1", "B", 3)
    _shot(store, "a3", "A", 4, verdict=Verdict.review, score=0.6)
    _shot(store, "a4", "A", 34)
    _shot(store, "c1", "A", 5, station="line-2")
    _shot(store, "d1", "D", 6, verdict=Verdict.pass_)
    return store


def _rows(store: DecisionStore, f: q.QueueFilters | None = None, window: float = 600) -> list[list[str]]:
    return [[p.request_id for p in part.photos] for part in P.queue(store, f or q.QueueFilters(), window_s=window)]


def test_repeated_photos_of_a_part_are_one_row_and_counts_count_parts(line: DecisionStore) -> None:
    assert _rows(line) == [["a1", "a2", "a3"], ["b1"], ["c1"], ["a4"]]
    assert P.count_waiting(line) == 4 and q.count_waiting(line) == 6  # parts, not photos
    first = P.queue(line, q.QueueFilters())[0]
    assert (first.request_id, first.part_id, first.verdict, first.defect_score) == ("a1", "A", "reject", 0.95)
    assert first.timestamp == NOW and first.last_timestamp == NOW + timedelta(minutes=4)
    assert first.worst.request_id == "a2"
    # the window is the config's: 0 keeps every photo on its own, a long one joins the later shot of A
    assert len(_rows(line, window=0)) == 6
    assert _rows(line, window=3600)[0] == ["a1", "a2", "a3", "a4"]
    assert [p.request_id for p in P.part_of(line, "a3").photos] == ["a1", "a2", "a3"]
    assert [p.request_id for p in P.part_of(line, "d1").photos] == ["d1"]  # a passed photo is its own part
    assert P.part_of(line, "nope") is None


def test_filters_select_parts_and_keep_all_their_photos(line: DecisionStore) -> None:
    # one photo of A matches "review" or a late "since": the row still carries every photo of the part
    assert _rows(line, q.QueueFilters(verdict="review")) == [["a1", "a2", "a3"]]
    assert _rows(line, q.QueueFilters(since=NOW + timedelta(minutes=3, seconds=30))) == [
        ["a1", "a2", "a3"],
        ["c1"],
        ["a4"],
    ]
    assert _rows(line, q.QueueFilters(station="line-2")) == [["c1"]]
    assert P.count_queue(line, q.QueueFilters(status="all")) == 4


def test_a_decision_applies_to_every_photo_of_the_part(line: DecisionStore) -> None:
    part = P.part_of(line, "a2")
    ids = P.record_part_decision(
        line, "a2", "confirm_defect", "ann", defect_type="crack", seen=P.parse_seen(part.seen())
    )
    assert len(ids) == 3
    for rid in ("a1", "a2", "a3"):
        current = q.part_detail(line, rid).current
        assert (current["action"], current["reviewer"], current["defect_type"]) == ("confirm_defect", "ann", "crack")
    assert _rows(line) == [["b1"], ["c1"], ["a4"]]
    decided = P.queue(line, q.QueueFilters(status="decided"))
    assert [(p.request_id, p.decision, p.reviewer) for p in decided] == [("a1", "confirm_defect", "ann")]
    labels = {sha for sha, *_ in q.reviewed_labels(line)}
    assert len(labels) == 1  # the three photos are one image here (same bytes): one label, 'defect'
    assert [r.label for r in q.reviewed_labels(line)] == ["defect"]
    trail = P.history(line, P.part_of(line, "a1"))
    assert [(e["action"], e["n_photos"], e["is_current"]) for e in trail] == [("confirm_defect", 3, True)]


def test_stale_page_or_new_photo_is_a_conflict_and_nothing_is_written(line: DecisionStore) -> None:
    seen = P.parse_seen(P.part_of(line, "a1").seen())
    q.record_decision(line, "a3", "override_ok", "bob")  # someone decided one photo meanwhile
    with pytest.raises(P.PartConflict, match="override_ok by bob"):
        P.record_part_decision(line, "a1", "confirm_defect", "ann", seen=seen)
    seen = P.parse_seen(P.part_of(line, "a1").seen())
    _shot(line, "a5", "A", 6)  # a new photo of the part arrived
    with pytest.raises(P.PartConflict, match="now has 4 photo"):
        P.record_part_decision(line, "a1", "confirm_defect", "ann", seen=seen)
    with line.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(reviews)).scalar_one() == 1
    with pytest.raises(q.ReviewError, match="only reject, review"):
        P.record_part_decision(line, "d1", "confirm_defect", "ann")
    with pytest.raises(q.ReviewError, match="not 'request_id:decision_id'"):
        P.parse_seen("a1:x")


def test_a_photo_after_the_decision_reopens_the_part(line: DecisionStore) -> None:
    P.record_part_decision(line, "a1", "override_ok", "ann")
    assert P.count_waiting(line) == 3
    _shot(line, "a5", "A", 8)
    part = P.part_of(line, "a1")
    assert part.waiting and part.n_waiting == 1 and part.decision is None
    assert P.count_waiting(line) == 4
    P.record_part_decision(line, "a5", "override_ok", "ann", seen=P.parse_seen(part.seen()))
    assert not P.part_of(line, "a1").waiting and P.part_of(line, "a1").decision == "override_ok"


def test_undo_withdraws_the_whole_part_decision(line: DecisionStore) -> None:
    P.record_part_decision(line, "a1", "confirm_defect", "ann", now=NOW + timedelta(hours=1))
    P.record_part_decision(line, "b1", "override_ok", "ann", now=NOW + timedelta(hours=2))
    P.record_part_decision(line, "c1", "override_ok", "bob", now=NOW + timedelta(hours=3))
    assert P.undo_part_decision(line, "ann") == "b1"  # her latest, not bob's
    assert P.undo_part_decision(line, "ann") == "a1"  # then the three photos of A together
    assert all(q.part_detail(line, rid).current is None for rid in ("a1", "a2", "a3"))
    assert P.undo_part_decision(line, "ann") is None
    with pytest.raises(q.ReviewError, match="made by bob"):
        P.undo_part_decision(line, "ann", request_id="c1")
    assert P.undo_part_decision(line, "boss", request_id="c1", may_undo_others=True) == "c1"
    assert P.count_waiting(line) == 4
    assert [e["undone"] for e in P.history(line, P.part_of(line, "a2"))] == [True, False]


def test_neighbours_and_next_waiting_move_by_part(line: DecisionStore) -> None:
    f = q.QueueFilters()
    assert P.neighbours(line, "a2", f) == (None, "b1")
    assert P.neighbours(line, "b1", f) == ("a1", "c1")
    P.record_part_decision(line, "b1", "override_ok", "ann")
    assert P.next_waiting(line, "b1", f) == "c1"  # b1 left the queue; its place still orders the next one
    assert P.next_waiting(line, "a4", f) == "a1"  # past the end: back to the oldest waiting part


# -- through the app -----------------------------------------------------------------------------------------


def test_app_shows_one_row_per_part_and_decides_all_its_photos(
    line: DecisionStore, tmp_path: Path, review_login
) -> None:
    config = ReviewConfig(store=str(tmp_path / "store"), password_time_cost=1, password_memory_kib=1024)
    app = create_app(config, store=line)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    client, token = review_login(app, "rita", PASSWORD, "/queue")
    html = client.get("/queue").text
    assert re.findall(r'data-href="/parts/(\w+)"', html) == ["a1", "b1", "c1", "a4"]
    assert 'data-testid="waiting-count">4<' in html and 'data-testid="waiting-total">4<' in html
    assert re.search(r'data-href="/parts/a1" class="row" data-photos="3"', html)
    assert html.count('src="/media/a') == 4  # a1's three thumbnails side by side, and a4's
    body = client.get("/api/queue").json()
    assert body["waiting"] == 4 and [p["request_id"] for p in body["items"][0]["photos"]] == ["a1", "a2", "a3"]

    page = client.get("/parts/a2").text  # any photo's id opens its part
    assert page.count('data-testid="photo"') == 3 and "one decision for all" in page
    for rid in ("a1", "a2", "a3"):
        assert f'src="/media/{rid}/image"' in page and f'src="/media/{rid}/heatmap"' in page
    seen = re.search(r'name="seen" value="([^"]*)"', page).group(1)
    assert seen == "a1:,a2:,a3:"
    r = client.post(
        "/parts/a1/decision",
        data={"csrf_token": token, "action": "confirm_defect", "seen": seen},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].startswith("/parts/b1?")
    assert P.count_waiting(line) == 3 and all(q.part_detail(line, rid).current for rid in ("a1", "a2", "a3"))
    # the same page posted again is stale: 409, nothing written
    r = client.post("/parts/a1/decision", data={"csrf_token": token, "action": "override_ok", "seen": seen})
    assert r.status_code == 409 and "changed meanwhile" in r.text
    # undo from the page withdraws the part's decision on all three photos and returns to the part
    r = client.post("/undo", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/parts/a1?")
    assert P.count_waiting(line) == 4
    trail = client.get("/parts/a1").text
    assert "(3 photos)" in trail and "undone" in trail
