"""The decision store, the review queries, the statistics and the review app on a real PostgreSQL server.

Issue 7 promises "SQLite by default, a PostgreSQL URL works the same"; the unit tests only ever see SQLite. Here a
throwaway PostgreSQL cluster is started from the server binaries (Debian package `postgresql`) on a free loopback
port, each test gets its own database, and the same behaviours are checked through a
`postgresql+psycopg://` URL: recording inspections with images, the queue order and filters, decisions, conflicts,
undo, reviewed labels, statistics, concurrent decisions (including the row lock that guards against a second
process) and the app's queue page for a logged-in user.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, insert, select

from inspection.decisions import DecisionStore, DecisionStoreError, inspections, reviews
from inspection.images import encode_png
from inspection.review import queries as q
from inspection.review.demo import DEMO_THRESHOLDS, seed_store
from inspection.review.stats import compute_stats, stats_summary
from inspection.schemas import InspectionResult, Verdict

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed (dev extra)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
PASSWORD = "correct horse battery"
PG_USER = "postgres"


def _server_bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):  # Debian keeps them here
        if (candidate / "initdb").is_file():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pg_server() -> Iterator[tuple[int, Path]]:
    """A PostgreSQL cluster in a temp dir, trust auth on loopback only; stopped and removed afterwards."""
    bin_dir = _server_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb) not found: run `make test` or deploy/install_test_servers.sh "
            "(Debian package `postgresql`)"
        )
    # PostgreSQL refuses to run as root: run the server as `nobody` then, in a directory it owns.
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="inspection-pg-"))
    data = root / "data"
    if as_user:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}

    def run(*args: str) -> None:
        proc = subprocess.run([*as_user, *args], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}"

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "-E", "UTF8", "--no-sync")
    port = _free_port()
    # durability settings off: a test cluster that is thrown away needs no fsync
    options = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    try:
        yield port, root
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            env=env,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


_db_numbers = itertools.count()


@pytest.fixture
def pg_url(pg_server: tuple[int, Path]) -> str:
    """A fresh, empty database on the test server for each test."""
    port, _ = pg_server
    name = f"inspection_{os.getpid()}_{next(_db_numbers)}"
    with psycopg.connect(host="127.0.0.1", port=port, user=PG_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/{name}"


@pytest.fixture
def store(pg_url: str, tmp_path: Path) -> Iterator[DecisionStore]:
    st = DecisionStore(pg_url, tmp_path / "media")
    assert st.engine.dialect.name == "postgresql" and not st.is_sqlite
    yield st
    st.close()


@pytest.fixture
def seeded(store: DecisionStore):
    parts = seed_store(store, n=6, n_pass=3, seed=1, now=NOW, image_size=96)
    return store, [p for p in parts if p.verdict != "pass"]


def _result(rid: str, verdict: Verdict, ts: datetime, **kw) -> InspectionResult:
    return InspectionResult(
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


# -- the store -----------------------------------------------------------------------------------------------


def test_record_and_read_back_inspections_with_images(store: DecisionStore) -> None:
    png = encode_png(np.full((40, 40, 3), 120, np.uint8))
    ts = datetime(2024, 5, 6, 14, 30, 15, 123456, tzinfo=UTC)
    heatmap = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    store.record_inspection(_result("r1", Verdict.reject, ts), png, heatmap, "http")
    store.record_inspection(
        _result("p1", Verdict.pass_, ts, score=0.1),
        png,
        heatmap,
        "folder",
        folder_identity=("id-1", "a.png", "processed"),
    )
    got = store.get_inspection("r1")
    assert got is not None
    assert got.timestamp == ts and got.timestamp.utcoffset() == timedelta(0)  # timestamptz comes back UTC, exact
    assert (got.verdict, got.defect_score, got.thresholds, got.model_version) == (
        Verdict.reject,
        0.9,
        DEMO_THRESHOLDS,
        "v9",
    )
    row = store.get_row("r1")
    assert store.media_path(row["image_path"]).read_bytes() == png
    assert np.abs(store.load_heatmap(row["heatmap_path"]) - heatmap).max() < 1e-4
    assert store.overlay_png("r1")[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.get_row("p1")["image_path"] is None  # passed parts keep no image
    assert store.count() == 2
    assert store.count_by_verdict() == {"pass": 1, "review": 0, "reject": 1}
    assert store.folder_file("id-1")["emitted"] == 0
    store.mark_emitted("id-1")
    assert store.folder_file("id-1")["emitted"] == 1
    with pytest.raises(DecisionStoreError, match="r1 .*already recorded"):
        store.record_inspection(_result("r1", Verdict.reject, ts), png, None, "http")
    assert store.count() == 2  # the failed insert left nothing behind
    assert store.get_inspection("nope") is None


# -- the review queries --------------------------------------------------------------------------------------


def test_queue_order_filters_and_counts(seeded) -> None:
    store, flagged = seeded
    items = q.queue(store, q.QueueFilters())
    assert [i.request_id for i in items] == [p.request_id for p in flagged]  # oldest first
    assert all(i.timestamp.tzinfo is not None for i in items)
    assert q.count_waiting(store) == 6 and q.count_queue(store, q.QueueFilters(status="all")) == 6
    for station in ("line-1", "line-2"):
        got = {i.request_id for i in q.queue(store, q.QueueFilters(station=station))}
        assert got == {p.request_id for p in flagged if p.station == station}
    for verdict in ("reject", "review"):
        got = {i.request_id for i in q.queue(store, q.QueueFilters(verdict=verdict))}
        assert got == {p.request_id for p in flagged if p.verdict == verdict}
    got = {i.request_id for i in q.queue(store, q.QueueFilters(model_version="v0002"))}
    assert got == {p.request_id for p in flagged if p.model_version == "v0002"}
    middle = flagged[2].timestamp
    assert {i.request_id for i in q.queue(store, q.QueueFilters(since=middle))} == {p.request_id for p in flagged[2:]}
    assert {i.request_id for i in q.queue(store, q.QueueFilters(until=middle))} == {p.request_id for p in flagged[:2]}
    assert [i.request_id for i in q.queue(store, q.QueueFilters(), limit=2, offset=1)] == [
        p.request_id for p in flagged[1:3]
    ]
    assert q.filter_options(store) == {"stations": ["line-1", "line-2"], "model_versions": ["v0001", "v0002"]}
    ids = [p.request_id for p in flagged]
    assert q.neighbours(store, ids[3], q.QueueFilters()) == (ids[2], ids[4])


def test_decisions_conflicts_and_undo(seeded) -> None:
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
    with pytest.raises(q.DecisionConflict, match="confirm_defect by ann"):
        q.record_decision(store, a, "override_ok", "bob", expected_current=None)  # bob's page was stale
    second = q.record_decision(store, a, "override_ok", "bob", expected_current=first)
    assert second > first
    detail = q.part_detail(store, a)
    assert detail.current["id"] == second and detail.current["replaces"] == first
    assert [h["comment"] for h in detail.history] == ["hairline", None]
    assert detail.history[0]["decided_at"].tzinfo is not None
    d3 = q.record_decision(store, b, "override_ok", "ann")
    # undo without a part: ann's latest decision still in effect is on b (her decision on a was replaced)
    assert q.undo_decision(store, "ann") == b
    assert q.part_detail(store, b).current is None
    with pytest.raises(q.ReviewError, match="made by bob"):
        q.undo_decision(store, "ann", request_id=a)
    assert q.undo_decision(store, "boss", request_id=a, may_undo_others=True) == a
    assert q.part_detail(store, a).current["id"] == first  # back to what bob's decision replaced
    history = q.part_detail(store, a).history
    assert [h["action"] for h in history] == ["confirm_defect", "override_ok", "undo"]
    assert [h["replaces"] for h in history] == [None, first, second]
    assert q.part_detail(store, b).history[-1]["replaces"] == d3
    assert q.count_waiting(store) == 5
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(reviews)).scalar_one() == 5  # append-only
    with pytest.raises(q.ReviewError, match="no inspection"):
        q.record_decision(store, "nope", "confirm_defect", "ann")


def test_reviewed_and_withdrawn_labels(seeded) -> None:
    store, flagged = seeded
    ids = [p.request_id for p in flagged]
    t0 = NOW + timedelta(hours=1)
    q.record_decision(store, ids[0], "confirm_defect", "ann", now=t0)
    q.record_decision(store, ids[1], "override_ok", "bob", now=t0 + timedelta(minutes=1))
    q.record_decision(store, ids[2], "confirm_defect", "ann", now=t0 + timedelta(minutes=2))
    q.record_decision(store, ids[2], "override_ok", "cat", now=t0 + timedelta(minutes=3))
    q.record_decision(store, ids[3], "confirm_defect", "ann", now=t0 + timedelta(minutes=4))
    q.undo_decision(store, "ann", request_id=ids[3])
    labels = q.reviewed_labels(store)
    sha = {rid: store.get_row(rid)["image_sha256"] for rid in ids}
    assert [(r.sha256, r.label, r.reviewer) for r in labels] == [
        (sha[ids[0]], "defect", "ann"),
        (sha[ids[1]], "ok", "bob"),
        (sha[ids[2]], "ok", "cat"),
    ]
    assert [r.decided_at for r in labels] == [t0, t0 + timedelta(minutes=1), t0 + timedelta(minutes=3)]
    for r in labels:
        assert Path(r.image_path).is_file() and r.sha256 in r.image_path
    assert [s for s, _ in q.withdrawn_labels(store)] == [sha[ids[3]]]
    # with a URL instead of an open store, as the flows call it
    assert q.reviewed_labels(store.url, store.media_dir) == labels


def test_stats(seeded) -> None:
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
    assert len(s.flagged_bins) == 3 and s.bin_hours == 1
    assert sum(rej for _, rej, _ in s.flagged_bins) == sum(p.verdict == "reject" for p in flagged)
    assert sum(rev for _, _, rev in s.flagged_bins) == sum(p.verdict == "review" for p in flagged)
    by_version: dict[str, int] = {}
    for p in flagged:
        by_version[p.model_version] = by_version.get(p.model_version, 0) + 1
    assert {v.model_version: v.flagged for v in s.per_version} == by_version
    line1 = compute_stats(store, NOW - timedelta(hours=3), NOW, station="line-1")
    assert line1.flagged == sum(p.station == "line-1" for p in flagged)
    empty = compute_stats(store, NOW - timedelta(days=90), NOW - timedelta(days=30))
    assert (empty.inspected, empty.override_rate, empty.bin_hours) == (0, None, 24)
    assert stats_summary(s)["override_rate"] == pytest.approx(1 / 3)


# -- concurrency ---------------------------------------------------------------------------------------------


def test_concurrent_decisions_on_one_part_exactly_one_wins(seeded) -> None:
    store, flagged = seeded
    rid = flagged[0].request_id
    n = 8
    barrier = threading.Barrier(n)
    won: list[int] = []
    conflicts: list[str] = []
    errors: list[BaseException] = []

    def decide(i: int) -> None:
        barrier.wait()
        try:
            won.append(q.record_decision(store, rid, "confirm_defect", f"user{i}", expected_current=None))
        except q.DecisionConflict as exc:
            conflicts.append(str(exc))
        except BaseException as exc:  # noqa: BLE001 - reported below, a thread must not swallow it
            errors.append(exc)

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(won) == 1 and len(conflicts) == n - 1
    assert q.part_detail(store, rid).current["id"] == won[0]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(reviews)).scalar_one() == 1


def test_row_lock_makes_a_decision_wait_for_another_writer(seeded, pg_url: str) -> None:
    """The in-process lock cannot see another process; the `FOR UPDATE` lock on the part must. A second engine
    (standing in for another review app process) locks the part and appends a decision; `record_decision` waits
    for it to commit, then sees that decision and refuses the stale one."""
    store, flagged = seeded
    rid = flagged[0].request_id
    other = DecisionStore(pg_url, store.media_dir)
    outcome: list[object] = []
    try:
        with other.engine.begin() as conn:
            conn.execute(select(inspections.c.request_id).where(inspections.c.request_id == rid).with_for_update())
            conn.execute(
                insert(reviews),
                {
                    "request_id": rid,
                    "action": "override_ok",
                    "reviewer": "other-process",
                    "decided_at": NOW,
                    "replaces": None,
                },
            )

            def decide() -> None:
                try:
                    outcome.append(q.record_decision(store, rid, "confirm_defect", "ann", expected_current=None))
                except q.DecisionConflict as exc:
                    outcome.append(exc)

            worker = threading.Thread(target=decide)
            worker.start()
            time.sleep(0.5)
            assert worker.is_alive(), "record_decision did not wait for the row lock"
        worker.join(30)  # the other transaction committed on leaving the block
        assert len(outcome) == 1 and isinstance(outcome[0], q.DecisionConflict)
        assert "override_ok by other-process" in str(outcome[0])
        assert q.part_detail(store, rid).current["reviewer"] == "other-process"
    finally:
        other.close()


# -- the app -------------------------------------------------------------------------------------------------


def test_review_app_serves_the_queue_from_a_postgres_url(pg_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from inspection.review import ReviewConfig, create_app

    media = tmp_path / "media"
    seeder = DecisionStore(pg_url, media)
    parts = [p.request_id for p in seed_store(seeder, n=4, n_pass=1, seed=2, now=NOW, image_size=96)]
    flagged = [rid for rid in parts if seeder.get_row(rid)["verdict"] != "pass"]
    seeder.close()
    config = ReviewConfig(store=pg_url, media_dir=str(media), password_time_cost=1, password_memory_kib=1024)
    app = create_app(config)
    try:
        assert app.state.store.engine.dialect.name == "postgresql"
        app.state.auth.add_user("rita", PASSWORD, "reviewer")
        client = TestClient(app)
        assert client.get("/queue", follow_redirects=False).status_code in (303, 401)  # no session, no queue
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
        r = client.post(
            "/login", data={"username": "rita", "password": PASSWORD, "csrf_token": token}, follow_redirects=False
        )
        assert r.status_code == 303, r.text
        page = client.get("/queue")
        assert page.status_code == 200
        assert re.search(rf'data-testid="waiting-count">{len(flagged)}<', page.text)
        assert re.findall(r'data-href="/parts/([0-9a-f]+)', page.text) == flagged
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = client.post(
            f"/parts/{flagged[0]}/decision",
            data={"csrf_token": token, "action": "confirm_defect", "defect_type": "crack", "expected": ""},
            follow_redirects=False,
        )
        assert r.status_code == 303, r.text
        assert re.search(rf'data-testid="waiting-count">{len(flagged) - 1}<', client.get("/queue").text)
        assert q.part_detail(app.state.store, flagged[0]).current["reviewer"] == "rita"
        assert client.get(f"/media/{flagged[1]}/image").status_code == 200
    finally:
        app.state.store.close()
