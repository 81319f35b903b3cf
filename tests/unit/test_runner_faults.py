"""The runner under the faults bench/faults.py found: a full disk, a busy store, SIGTERM, a registry share that
goes away. Contract-shaped fake model (score = mean pixel / 255); real sockets where the fault lives there."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from inspection.decisions import DecisionStore, StoreBusyError
from inspection.images import encode_jpeg
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, BatchingConfig
from inspection.runner.hotswap import HotSwapper
from inspection.runner.service import draining_server
from inspection.schemas import InspectionResult, Verdict
from tests.fixtures.serving import fake_inferencer, free_port, sample_frame

TOKEN = "faults-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PASS_FRAME, REJECT_FRAME = encode_jpeg(sample_frame(10)), encode_jpeg(sample_frame(250))


def _runtime(tmp_path, **kw) -> tuple[RunnerConfig, Runtime]:
    cfg = replace(RunnerConfig(store=str(tmp_path / "store"), station="st-f", auth=AuthConfig(token=TOKEN)), **kw)
    rt = Runtime.build(cfg)
    rt.holder.swap(fake_inferencer())
    return cfg, rt


def _post(c, body: bytes, part: str = "P-1"):
    return c.post("/v1/inspect", content=body, headers={**AUTH, "Content-Type": "image/jpeg"}, params={"part_id": part})


def _disk_full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


# -- the decision store's filesystem full -------------------------------------------------------------------------


def test_verdict_whose_image_does_not_fit_is_held_as_stored_review_not_lost(tmp_path, monkeypatch):
    """Disk full: the reject's image cannot be written. The part must be held (503 + a stored `review` without
    the image), not answered `store_error` with nothing stored."""
    cfg, rt = _runtime(tmp_path)
    monkeypatch.setattr(rt.store, "_save_image", _disk_full)
    with TestClient(create_app(cfg, rt)) as c:
        r = _post(c, REJECT_FRAME)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["reason"] == "store_degraded" and body["result"]["verdict"] == "review"
        row = rt.store.get_row(body["result"]["request_id"])
        assert row is not None and row["verdict"] == "review" and row["image_path"] is None
        assert row["reason"].startswith("store_degraded") and row["defect_score"] == body["result"]["defect_score"]
        ready = c.get("/readyz").json()
        assert ready["degraded"] and "decision store" in ready["degraded_reasons"][0]
        monkeypatch.undo()  # space is back: the next part gets its verdict and /readyz recovers by itself
        r = _post(c, REJECT_FRAME, "P-2")
        assert r.status_code == 200 and r.json()["verdict"] == "reject"
        assert c.get("/readyz").json()["degraded"] is False


def test_held_part_whose_image_does_not_fit_holds_later_verdicts_until_space_is_back(tmp_path, monkeypatch):
    """A bad image held as `review` whose bytes hit a full disk is stored without them, and, as when a batch's
    write fails, the runner then holds every part until the store has space again (no verdict slips through)."""
    cfg, rt = _runtime(tmp_path)
    monkeypatch.setattr(rt.store, "_save_image", _disk_full)
    monkeypatch.setattr(rt, "_space_back", lambda: False)  # the filesystem stays full
    with TestClient(create_app(cfg, rt)) as c:
        r = _post(c, b"\xff\xd8 not a whole jpeg")
        assert r.status_code == 415 and r.json()["result"]["verdict"] == "review"
        row = rt.store.get_row(r.json()["result"]["request_id"])
        assert row is not None and row["image_path"] is None  # stored without the bytes that did not fit
        assert rt.hold_until_space
        r = _post(c, PASS_FRAME, "P-2")  # a good frame now: no verdict while the store is short of space
        assert r.status_code == 503 and r.json()["result"]["verdict"] == "review"


def test_pass_never_answered_when_the_database_is_full(tmp_path):
    """SQLite says 'database or disk is full' for the batch: the pass becomes a stored `review` hold (503)."""
    cfg, rt = _runtime(tmp_path)
    record_many = rt.store.record_many
    calls = []

    def full_once(decisions, timeout_s=None):
        calls.append([d[0].verdict for d in decisions])
        if len(calls) == 1:
            raise OperationalError("INSERT INTO inspections", {}, Exception("database or disk is full"))
        record_many(decisions, timeout_s=timeout_s)

    rt.store.record_many = full_once
    with TestClient(create_app(cfg, rt)) as c:
        r = _post(c, PASS_FRAME)
    assert r.status_code == 503 and r.json()["reason"] == "store_degraded"
    assert calls == [[Verdict.pass_], [Verdict.review]]  # the verdict, then its hold
    stored = rt.store.get_inspection(r.json()["result"]["request_id"])
    assert stored is not None and stored.verdict == Verdict.review


def test_held_part_is_stored_without_its_bytes_when_they_do_not_fit(tmp_path, monkeypatch):
    """A bad image (held anyway) on a full disk: its review is stored without the bytes, not dropped."""
    cfg, rt = _runtime(tmp_path)
    monkeypatch.setattr(rt.store, "_save_image", _disk_full)
    with TestClient(create_app(cfg, rt)) as c:
        r = _post(c, PASS_FRAME[: len(PASS_FRAME) // 2])  # truncated JPEG: 422, held
    assert r.status_code == 422 and r.json()["reason"] == "truncated"
    row = rt.store.get_row(r.json()["result"]["request_id"])
    assert row is not None and row["verdict"] == "review" and row["image_path"] is None


def test_failed_media_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store = DecisionStore(tmp_path / "store")
    monkeypatch.setattr(os, "replace", _disk_full)  # the write got as far as the temporary file
    with pytest.raises(OSError):
        store._save_image(PASS_FRAME, "ab" * 32)
    assert [p for p in (tmp_path / "store" / "images").rglob("*") if p.is_file()] == []


def test_real_sqlite_full_then_space_back(tmp_path):
    """A real SQLITE_FULL (max_page_count): never a pass without a stored decision; the next write after space
    returns works without a restart."""
    cfg, rt = _runtime(tmp_path)
    path = tmp_path / "store" / "decisions.sqlite"
    with TestClient(create_app(cfg, rt)) as c:
        assert _post(c, PASS_FRAME, "warm").status_code == 200
        con = sqlite3.connect(path)
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.close()

        def cap(dbapi_conn, _rec=None):
            dbapi_conn.execute(f"PRAGMA max_page_count={pages}")

        rt.store.engine.dispose()
        from sqlalchemy import event

        event.listen(rt.store.engine, "connect", cap)
        answers = [_post(c, PASS_FRAME, f"full-{i}") for i in range(40)]
        for r in answers:
            result = r.json() if r.status_code == 200 else r.json()["result"]
            if r.status_code == 200:  # a stored verdict is fine; a pass that is not stored is not
                assert rt.store.get_inspection(result["request_id"]) is not None
            else:
                assert r.status_code == 503 and result["verdict"] == "review"
        assert any(r.status_code == 503 for r in answers), "the capped database never filled"
        event.remove(rt.store.engine, "connect", cap)
        rt.store.engine.dispose()
        r = _post(c, PASS_FRAME, "after")
        assert r.status_code == 200 and r.json()["verdict"] == "pass"
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# -- another writer (the review app) holding the store ------------------------------------------------------------


def test_store_write_waits_for_another_writer_at_most_until_the_answer_is_due(tmp_path):
    cfg, rt = _runtime(tmp_path, batching=BatchingConfig(timeout_s=0.5))
    with TestClient(create_app(cfg, rt)) as c:
        assert _post(c, PASS_FRAME, "warm").status_code == 200
        review_app = sqlite3.connect(tmp_path / "store" / "decisions.sqlite", isolation_level=None)
        review_app.execute("BEGIN IMMEDIATE")
        try:
            t0 = time.perf_counter()
            r = _post(c, PASS_FRAME, "while-locked")
            waited = time.perf_counter() - t0
        finally:
            time.sleep(1.0)  # the lock outlives the answer: the runner must not have waited for it
            review_app.execute("COMMIT")
            review_app.close()
        assert waited < 1.0, f"answer took {waited:.2f} s with a 0.5 s timeout"
        assert r.status_code == 503 and r.json()["reason"] == "store_error"
        assert rt.store.get_row(r.json()["result"]["request_id"]) is None  # not acknowledged, not stored later
        assert _post(c, PASS_FRAME, "after").status_code == 200


def test_bounded_write_raises_busy_instead_of_waiting(tmp_path):
    store = DecisionStore(tmp_path / "store")
    other = sqlite3.connect(tmp_path / "store" / "decisions.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    result = InspectionResult(
        request_id="r1", part_id="p", station="s", timestamp="2026-01-01T00:00:00Z", verdict="review", latency_ms=1.0
    )
    t0 = time.perf_counter()
    with pytest.raises(OperationalError, match="locked"):
        store.record_inspection(result, None, None, "http", timeout_s=0.2)
    assert time.perf_counter() - t0 < 1.0
    other.execute("COMMIT")
    store._write_lock.acquire()
    try:
        with pytest.raises(StoreBusyError):
            store.record_inspection(result, None, None, "http", timeout_s=0.1)
    finally:
        store._write_lock.release()
    store.record_inspection(result, None, None, "http", timeout_s=0.2)
    assert store.get_inspection("r1") is not None


# -- SIGTERM ----------------------------------------------------------------------------------------------------


def test_sigterm_drains_holding_new_parts_then_exits(tmp_path):
    """First signal: the port stays open, new parts get 503 + a stored review, /readyz 503; then the server
    exits by itself. (uvicorn's own handler closed the port at once: new parts got a reset and no decision.)"""
    import uvicorn

    cfg, rt = _runtime(tmp_path, drain_s=1.0)
    port = free_port()
    server = draining_server(
        uvicorn.Config(create_app(cfg, rt), host="127.0.0.1", port=port, log_level="warning"), rt, cfg.drain_s
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as h:
        assert (
            h.post(
                "/v1/inspect", content=PASS_FRAME, headers={"Content-Type": "image/jpeg"}, params={"part_id": "before"}
            ).status_code
            == 200
        )
        t_sig = time.perf_counter()
        server.handle_exit(signal.SIGTERM, None)
        r = h.post(
            "/v1/inspect", content=PASS_FRAME, headers={"Content-Type": "image/jpeg"}, params={"part_id": "after"}
        )
        ready = h.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "shutting_down", r.text
    assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == Verdict.review
    assert ready.status_code == 503 and ready.json()["draining"] is True
    thread.join(15)
    assert not thread.is_alive() and time.perf_counter() - t_sig < 10


# -- the registry share going away --------------------------------------------------------------------------------


def _alias(root: Path, version: str, bump: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "aliases.json").write_text(json.dumps({"production": version, "previous": None}))
    st = (root / "aliases.json").stat()
    os.utime(root / "aliases.json", ns=(st.st_atime_ns, st.st_mtime_ns + bump * 10_000_000))


def test_watcher_survives_an_unreadable_share_and_follows_the_alias_after(tmp_path, monkeypatch):
    """A dead NFS/SMB share raises ESTALE/EIO/ENOTCONN on stat (not FileNotFoundError): the watcher thread must
    live on, the model keep serving, /readyz say degraded, and the next promotion be picked up."""
    from inspection.runner.hotswap import ModelHolder

    root = tmp_path / "reg"
    holder = ModelHolder()
    sw = HotSwapper(root, holder, poll_s=0.02, loader=lambda v: fake_inferencer(v))
    sw.resolve = lambda: json.loads((root / "aliases.json").read_text())["production"]
    _alias(root, "v1", 1)
    assert sw.check() == "swapped"
    real_stat = Path.stat
    gone = threading.Event()

    def stat(self, *a, **k):
        if gone.is_set() and str(self).startswith(str(root)):
            raise OSError(errno.ESTALE, "Stale file handle", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", stat)
    sw.start(initial=False)
    try:
        gone.set()
        deadline = time.time() + 5  # until the watcher has polled the unreadable share at least once
        while not sw.degraded_reasons() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)  # and polled again after the error: it must still be alive
        assert sw._thread.is_alive(), "the hot-swap watcher died on the share's OSError"
        assert holder.current.version == "v1"
        assert sw.degraded_reasons() and "cannot be read" in sw.degraded_reasons()[0]
        gone.clear()
        _alias(root, "v2", 2)
        deadline = time.time() + 5
        while holder.current.version != "v2" and time.time() < deadline:
            time.sleep(0.02)
        assert holder.current.version == "v2" and sw.degraded_reasons() == []
    finally:
        sw.stop()


def test_readyz_degraded_while_the_registry_folder_is_gone(tmp_path):
    root = tmp_path / "reg"
    cfg, rt = _runtime(tmp_path)
    rt.swapper = HotSwapper(root, rt.holder, loader=lambda v: fake_inferencer(v))
    _alias(root, "fake-1", 1)
    with TestClient(create_app(cfg, rt)) as c:
        assert rt.swapper.check() == "unchanged"
        assert c.get("/readyz").json()["degraded"] is False
        root.rename(tmp_path / "reg.away")  # the share is unmounted / renamed away
        assert rt.swapper.check() == "no_alias"
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] and r.json()["model_version"] == "fake-1"
        assert r.json()["degraded"] is True and "registry" in r.json()["degraded_reasons"][0]
        assert _post(c, PASS_FRAME).status_code == 200  # the current model serves on
        (tmp_path / "reg.away").rename(root)
        assert rt.swapper.check() == "unchanged"
        assert c.get("/readyz").json()["degraded"] is False and rt.swapper.last_error is None


def test_readyz_degraded_while_the_alias_points_at_a_refused_version(tmp_path):
    root = tmp_path / "reg"
    cfg, rt = _runtime(tmp_path)

    def loader(version):
        if version == "bad":
            raise ValueError("protobuf parsing failed")
        return fake_inferencer(version)

    rt.swapper = HotSwapper(root, rt.holder, loader=loader)
    _alias(root, "bad", 1)
    with TestClient(create_app(cfg, rt)) as c:
        assert rt.swapper.check() == "refused"
        body = c.get("/readyz").json()
        assert body["model_version"] == "fake-1" and body["degraded"] is True
        assert "bad" in body["degraded_reasons"][0] and "protobuf" in body["degraded_reasons"][0]


def test_no_verdict_is_given_while_the_store_is_short_of_space(tmp_path, monkeypatch):
    """Once a write failed for lack of space, a pass whose small row would still fit is held too (503 + review),
    until the filesystem has room again; then verdicts come back by themselves."""
    import shutil

    cfg, rt = _runtime(tmp_path)
    free = {"bytes": 0}
    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        shutil,
        "disk_usage",
        lambda p: real_usage(p)._replace(free=free["bytes"]),  # type: ignore[attr-defined]
    )
    save_image = rt.store._save_image
    monkeypatch.setattr(rt.store, "_save_image", _disk_full)
    with TestClient(create_app(cfg, rt)) as c:
        assert _post(c, REJECT_FRAME, "R-1").json()["reason"] == "store_degraded"  # the image did not fit
        r = _post(c, PASS_FRAME, "P-1")  # no image needed, its row would fit: still held
        assert r.status_code == 503 and r.json()["reason"] == "store_degraded", r.text
        assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == Verdict.review
        assert any("short of space" in why for why in c.get("/readyz").json()["degraded_reasons"])
        monkeypatch.setattr(rt.store, "_save_image", save_image)
        free["bytes"] = 1 << 30  # space is back
        r = _post(c, PASS_FRAME, "P-2")
        assert r.status_code == 200 and r.json()["verdict"] == "pass"
        assert _post(c, REJECT_FRAME, "R-2").json()["verdict"] == "reject"
        assert c.get("/readyz").json()["degraded"] is False


# -- a model file damaged before it was hashed --------------------------------------------------------------------


def test_smoke_reference_tells_damaged_weights_from_the_exported_model():
    from inspection.runner.inferencer import Inferencer, ModelRejectedError, smoke_reference
    from tests.fixtures.serving import FakeModel, fake_card

    good = fake_inferencer("v1")
    reference = smoke_reference(good.model, good.input_size)
    assert good.check_reference(reference) < 1e-6  # rounded to 7 digits in the file

    class Damaged(FakeModel):  # sane-looking outputs, a little off: what zeroed weights give
        def predict(self, batch, busy=False):
            probs, heat = super().predict(batch)
            return probs * 0.99, heat

    bad = Inferencer(Damaged(), "v2", fake_card("v2"), Path("fake.onnx"))
    bad.smoke_test()  # the plain smoke test cannot see it
    with pytest.raises(ModelRejectedError, match="reference"):
        bad.check_reference(reference)
    with pytest.raises(ModelRejectedError, match="unusable"):
        good.check_reference({"scores": [0.5]})


# -- memory flat under load ---------------------------------------------------------------------------------------


def test_model_memory_grows_to_its_peak_at_load_not_under_load(tmp_path):
    """onnxruntime's arenas grow with the largest concurrent batches they have seen: the runner runs its largest
    micro-batch on as many sessions at once as it has workers before a model serves (RSS then stays flat)."""
    from inspection.runner.config import SwapConfig
    from tests.fixtures.serving import FakeModel

    class Recording(FakeModel):
        def __init__(self):
            super().__init__()
            self.calls: list[tuple[int, bool]] = []

        def predict(self, batch, busy=False):
            with self.lock:
                self.calls.append((batch.shape[0], busy))
            return super().predict(batch, busy)

    inf = fake_inferencer()
    inf.model = Recording()
    inf.warm_up_peak(16, 3)
    assert sorted(inf.model.calls) == [(16, False), (16, True), (16, True)]
    cfg = replace(
        RunnerConfig(store=str(tmp_path / "store"), registry=tmp_path / "reg", auth=AuthConfig(token=TOKEN)),
        batching=BatchingConfig(max_batch_size=12, workers=2),
        swap=SwapConfig(enabled=False),
    )
    loader = Runtime.build(cfg).swapper._load
    assert loader.keywords["peak_batch"] == 12 and loader.keywords["peak_concurrency"] == 2
