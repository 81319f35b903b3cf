"""An old PostgreSQL decision store (created before products and defect types) gets the new `inspections` columns
when a DecisionStore opens it, keeps its rows, and two processes' stores opening it at once both work."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from inspection.decisions import DecisionStore
from inspection.schemas import InspectionResult, Thresholds, Verdict
from tests.integration.test_postgres_store import pg_server, pg_url  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

OLD_TABLE = """
CREATE TABLE inspections (
    request_id VARCHAR(64) PRIMARY KEY, part_id VARCHAR(256) NOT NULL, station VARCHAR(128) NOT NULL,
    timestamp TIMESTAMP WITH TIME ZONE NOT NULL, verdict VARCHAR(16) NOT NULL, defect_score FLOAT,
    reject_threshold FLOAT, review_threshold FLOAT, model_version VARCHAR(128), latency_ms FLOAT NOT NULL,
    reason TEXT, image_sha256 VARCHAR(64), image_path TEXT, heatmap_path TEXT, source VARCHAR(16) NOT NULL
)"""


def test_an_old_postgres_store_gets_the_new_columns(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text(OLD_TABLE))
        conn.execute(
            text(
                "INSERT INTO inspections (request_id, part_id, station, timestamp, verdict, defect_score, "
                "latency_ms, source) VALUES ('old-1', 'P', 's', now(), 'reject', 0.9, 3.0, 'http')"
            )
        )
    engine.dispose()
    stores: list[DecisionStore] = []
    errors: list[BaseException] = []

    def open_store(i: int) -> None:  # the runner and the review app starting together
        try:
            stores.append(DecisionStore(pg_url, tmp_path / f"media{i}"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_store, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = stores[0]
    columns = {c["name"] for c in inspect(store.engine).get_columns("inspections")}
    assert {"product", "defect_type", "defect_type_probability"} <= columns
    old = store.get_inspection("old-1")
    assert old.verdict == "reject" and old.product is None and old.defect_type is None
    new = InspectionResult(
        request_id="new-1",
        part_id="P2",
        station="s",
        timestamp=datetime.now(UTC),
        verdict=Verdict.reject,
        defect_score=0.95,
        thresholds=Thresholds(reject=0.5, review=0.25),
        model_version="typed-1",
        latency_ms=4.0,
        product="tile",
        defect_type="blowhole",
        defect_type_probability=0.75,
    )
    store.record_inspection(new, None, None, "http")
    assert stores[1].get_inspection("new-1") == new
    for s in stores:
        s.close()
