"""The decision store: rows round-trip, media of held/rejected parts are kept, writes are thread-safe."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import insert, select

from inspection.decisions import DecisionStore, DecisionStoreError, reviews
from inspection.images import decode_image, encode_jpeg
from inspection.schemas import InspectionResult, Thresholds, Verdict


def _result(request_id: str, verdict: Verdict, score: float | None = 0.5, reason: str | None = None):
    return InspectionResult(
        request_id=request_id,
        part_id=f"part-{request_id}",
        station="st1",
        timestamp=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        verdict=verdict,
        defect_score=score,
        thresholds=Thresholds(reject=0.8, review=0.3) if score is not None else None,
        model_version="v1" if score is not None else None,
        latency_ms=4.2,
        reason=reason,
    )


@pytest.fixture()
def jpeg() -> bytes:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return encode_jpeg(img)


def test_round_trip_and_wal(tmp_path, jpeg):
    store = DecisionStore(tmp_path / "db")
    r = _result("a1", Verdict.pass_, 0.1)
    store.record_inspection(r, jpeg, np.zeros((2, 2), np.float32), "http")
    got = store.get_inspection("a1")
    assert got is not None
    assert got == r.model_copy(update={"image_sha256": got.image_sha256})
    assert got.timestamp.tzinfo is not None and got.timestamp == r.timestamp
    assert len(got.image_sha256) == 64
    row = store.get_row("a1")
    assert row["source"] == "http"
    assert row["image_path"] is None and row["heatmap_path"] is None  # pass: nothing kept
    assert store.get_inspection("nope") is None
    mode = sqlite3.connect(tmp_path / "db" / "decisions.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_reject_keeps_image_content_addressed_and_heatmap(tmp_path, jpeg):
    store = DecisionStore(tmp_path / "d.sqlite", media_dir=tmp_path / "media")
    heat = np.linspace(0, 1, 49, dtype=np.float32).reshape(7, 7)
    store.record_inspection(_result("r1", Verdict.reject, 0.9), jpeg, heat, "folder")
    store.record_inspection(_result("r2", Verdict.review, 0.4), jpeg, heat, "http")
    row1, row2 = store.get_row("r1"), store.get_row("r2")
    assert row1["image_path"] == row2["image_path"]  # same bytes stored once
    sha = row1["image_sha256"]
    assert row1["image_path"] == f"images/{sha[:2]}/{sha}.jpg"
    assert (tmp_path / "media" / row1["image_path"]).read_bytes() == jpeg
    assert row2["heatmap_path"] == "heatmaps/r2.png"
    assert np.abs(store.load_heatmap(row2["heatmap_path"]) - heat).max() < 1e-4  # the raw map, 16-bit
    overlay = decode_image(store.overlay_png("r2"))
    assert overlay.shape == (48, 64, 3)  # rendered on demand at the camera frame's size
    corner_lo, corner_hi = overlay[1, 1].astype(int), overlay[-2, -2].astype(int)
    assert corner_hi[0] > corner_lo[0] + 50  # jet colours: the hot corner is red, the cold one is not
    assert store.count_by_verdict() == {"pass": 0, "review": 1, "reject": 1}


def test_held_without_score_and_bad_bytes(tmp_path):
    store = DecisionStore(tmp_path)
    garbage = b"not an image at all"
    store.record_inspection(_result("h1", Verdict.review, None, "corrupt: nope"), garbage, None, "http")
    got = store.get_inspection("h1")
    assert got.defect_score is None and got.thresholds is None and got.reason == "corrupt: nope"
    assert store.get_row("h1")["image_path"].endswith(".bin")


def test_duplicate_and_bad_source_refused(tmp_path):
    store = DecisionStore(tmp_path)
    store.record_inspection(_result("x", Verdict.pass_, 0.1), None, None, "http")
    with pytest.raises(DecisionStoreError, match="already recorded"):
        store.record_inspection(_result("x", Verdict.pass_, 0.1), None, None, "http")
    with pytest.raises(DecisionStoreError, match="allowed"):
        store.record_inspection(_result("y", Verdict.pass_, 0.1), None, None, "plc")
    assert store.count() == 1


def test_url_needs_media_dir():
    with pytest.raises(DecisionStoreError, match="media_dir"):
        DecisionStore("postgresql+psycopg://u@h/db")


def test_concurrent_writes(tmp_path, jpeg):
    store = DecisionStore(tmp_path)
    errors = []

    def work(k: int) -> None:
        try:
            for i in range(25):
                v = (Verdict.pass_, Verdict.review, Verdict.reject)[i % 3]
                store.record_inspection(_result(f"{k}-{i}", v, 0.5), jpeg, np.ones((3, 3)), "http")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count() == 150
    assert sum(store.count_by_verdict().values()) == 150


def test_reviews_table_is_usable_by_the_review_app(tmp_path):
    store = DecisionStore(tmp_path)
    store.record_inspection(_result("q", Verdict.review, 0.5), None, None, "http")
    with store.engine.begin() as conn:
        first = conn.execute(
            insert(reviews).values(
                request_id="q", action="confirm_defect", reviewer="ann", decided_at=datetime.now(UTC)
            )
        ).inserted_primary_key[0]
        conn.execute(
            insert(reviews).values(
                request_id="q", action="override_ok", reviewer="bob", decided_at=datetime.now(UTC), replaces=first
            )
        )
        rows = conn.execute(select(reviews).order_by(reviews.c.id)).mappings().all()
    assert [r["action"] for r in rows] == ["confirm_defect", "override_ok"] and rows[1]["replaces"] == first


def test_folder_identity_in_same_transaction(tmp_path):
    store = DecisionStore(tmp_path)
    store.record_inspection(
        _result("f1", Verdict.pass_, 0.1), None, None, "folder", folder_identity=("id1", "a.png", "processed")
    )
    rec = store.folder_file("id1")
    assert rec["request_id"] == "f1" and rec["emitted"] == 0
    store.mark_emitted("id1")
    assert store.folder_file("id1")["emitted"] == 1
    # the same identity again is refused and leaves no second decision behind
    with pytest.raises(DecisionStoreError):
        store.record_inspection(
            _result("f2", Verdict.pass_, 0.1), None, None, "folder", folder_identity=("id1", "a.png", "processed")
        )
    assert store.get_inspection("f2") is None


def test_heatmap_is_tiny_and_overlay_survives_bad_image(tmp_path, jpeg):
    store = DecisionStore(tmp_path)
    heat = np.ones((7, 7), np.float32)
    store.record_inspection(_result("d1", Verdict.reject, 0.9), jpeg, heat, "http")
    row = store.get_row("d1")
    assert (tmp_path / row["heatmap_path"]).stat().st_size < 200  # the line writes a few bytes, not an overlay
    assert (tmp_path / row["image_path"]).read_bytes() == jpeg
    store.record_inspection(_result("d2", Verdict.review, None, "corrupt: nope"), b"garbage", heat, "http")
    assert decode_image(store.overlay_png("d2")).shape == (224, 224, 3)  # the map alone when the bytes are bad
    store.record_inspection(_result("d3", Verdict.pass_, 0.1), jpeg, heat, "http")
    assert store.overlay_png("d3") is None and store.overlay_png("nope") is None
    with pytest.raises(DecisionStoreError, match="2-D"):
        store.record_inspection(_result("d4", Verdict.reject, 0.9), jpeg, np.ones((2, 2, 2)), "http")
    legacy = encode_jpeg(np.zeros((8, 8, 3), np.uint8))  # earlier runners stored a rendered colour overlay
    (tmp_path / row["heatmap_path"]).write_bytes(legacy)
    assert store.overlay_png("d1") == legacy
