"""The decision store's MQTT outbox: written with the decision, read oldest first, deleted once delivered."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest

from inspection.decisions import DecisionStore, DecisionStoreError
from inspection.runner.metrics import RunnerMetrics
from inspection.runner.outbox import Outbox
from inspection.schemas import InspectionResult, Verdict


def _result(i: int, station: str = "st-1", verdict: Verdict = Verdict.pass_) -> InspectionResult:
    return InspectionResult(
        request_id=f"req-{i:04d}",
        part_id=f"P-{i}",
        station=station,
        timestamp=datetime.now(UTC),
        verdict=verdict,
        latency_ms=1.0,
    )


@pytest.fixture()
def store(tmp_path):
    s = DecisionStore(tmp_path / "store")
    yield s
    s.close()


def test_no_outbox_rows_unless_enabled(store):
    store.record_inspection(_result(1), None, None, "http")
    assert store.outbox_count("st-1") == 0


def test_rows_written_with_the_decision_in_order_and_deleted_when_delivered(store):
    metrics = RunnerMetrics()
    box = Outbox(store, "st-1", lambda r: f"inspection/{r.station}/verdict", max_rows=100, metrics=metrics)
    store.record_inspection(_result(0), None, None, "http")
    store.record_many([(_result(i, "st-9"), None, None, "http") for i in range(1, 5)])
    store.record_inspection(_result(5, verdict=Verdict.review), None, None, "opcua")
    assert box.refresh() == 6
    pending = box.pending(10)
    assert [m.request_id for m in pending] == [f"req-{i:04d}" for i in range(6)]
    assert pending[1].topic == "inspection/st-9/verdict"
    assert InspectionResult.model_validate_json(pending[5].payload).verdict == Verdict.review
    box.delivered(pending[:4])
    assert [m.request_id for m in box.pending(10)] == ["req-0004", "req-0005"]
    assert box.refresh() == 2
    text = generate_latest(metrics.registry).decode()
    assert "inspection_runner_mqtt_outbox_backlog 2.0" in text
    assert "inspection_runner_mqtt_delivered_total 4.0" in text


def test_a_refused_decision_leaves_no_outbox_row(store):
    box = Outbox(store, "st-1", lambda r: "t", max_rows=100)
    store.record_inspection(_result(1), None, None, "http")
    with pytest.raises(DecisionStoreError):
        store.record_inspection(_result(1), None, None, "http")  # same request id: the transaction rolls back
    with pytest.raises(DecisionStoreError):
        store.record_many([(_result(2), None, None, "http"), (_result(1), None, None, "http")])
    assert [m.request_id for m in box.pending(10)] == ["req-0001"]


def test_producers_do_not_see_each_others_rows(tmp_path):
    a = DecisionStore(tmp_path / "shared")
    b = DecisionStore(tmp_path / "shared")
    try:
        box_a = Outbox(a, "runner-a", lambda r: "t", max_rows=100)
        box_b = Outbox(b, "runner-b", lambda r: "t", max_rows=100)
        a.record_inspection(_result(1), None, None, "http")
        b.record_inspection(_result(2), None, None, "http")
        assert [m.request_id for m in box_a.pending(10)] == ["req-0001"]
        assert [m.request_id for m in box_b.pending(10)] == ["req-0002"]
    finally:
        a.close()
        b.close()


def test_a_full_outbox_drops_the_oldest_and_counts_them(store):
    metrics = RunnerMetrics()
    box = Outbox(store, "st-1", lambda r: "t", max_rows=3, metrics=metrics)
    store.record_many([(_result(i), None, None, "http") for i in range(5)])
    assert box.refresh() == 3
    assert [m.request_id for m in box.pending(10)] == ["req-0002", "req-0003", "req-0004"]
    assert "inspection_runner_mqtt_outbox_dropped_total 2.0" in generate_latest(metrics.registry).decode()
    assert store.count() == 5  # the decisions themselves are all kept
