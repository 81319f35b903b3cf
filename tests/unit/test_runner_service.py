"""The runner's HTTP API with a contract-shaped fake model: endpoints, fail-closed, auth, every decision stored."""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import replace

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from inspection.images import decode_image, encode_jpeg, encode_png
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, BatchingConfig
from inspection.schemas import InspectionResult
from tests.fixtures.serving import bad_inputs, fake_inferencer, sample_frame, serve_in_thread

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _config(tmp_path, **kw) -> RunnerConfig:
    base = RunnerConfig(store=str(tmp_path / "store"), station="st-7", auth=AuthConfig(token=TOKEN))
    return replace(base, **kw)


def _app(tmp_path, model=True, config=None, **fake):
    cfg = config or _config(tmp_path)
    rt = Runtime.build(cfg)
    if model:
        rt.holder.swap(fake_inferencer(**fake))
    return create_app(cfg, rt), rt


@pytest.fixture()
def client(tmp_path):
    app, rt = _app(tmp_path)
    with TestClient(app) as c:
        c.rt = rt
        yield c


def _post(client, body: bytes, ctype="image/jpeg", part="P-1", headers=None, **params):
    h = {**AUTH, **({"Content-Type": ctype} if ctype else {}), **(headers or {})}
    return client.post("/v1/inspect", content=body, headers=h, params={"part_id": part, **params})


@pytest.mark.parametrize(("value", "verdict"), [(10, "pass"), (140, "review"), (250, "reject")])
def test_inspect_raw_body_verdicts_and_store(client, value, verdict):
    body = encode_png(sample_frame(value))
    r = _post(client, body, "image/png")
    assert r.status_code == 200, r.text
    res = InspectionResult.model_validate_json(r.text)
    assert res.verdict == verdict and res.part_id == "P-1" and res.station == "st-7"
    expected = decode_image(body).mean() / 255
    assert res.defect_score == pytest.approx(expected, abs=1e-5)
    assert res.model_version == "fake-1" and res.thresholds.reject == 0.8 and res.latency_ms > 0
    row = client.rt.store.get_row(res.request_id)
    assert row is not None and row["verdict"] == verdict and row["source"] == "http"
    kept = verdict in ("review", "reject")
    assert (row["image_path"] is not None) == kept and (row["heatmap_path"] is not None) == kept
    if kept:
        assert (client.rt.store.media_dir / row["image_path"]).read_bytes() == body
        assert client.rt.store.load_heatmap(row["heatmap_path"]).ndim == 2  # written before the answer


def test_inspect_multipart_and_headers(client):
    body = encode_jpeg(sample_frame(30))
    r = client.post(
        "/v1/inspect",
        files={"file": ("p.jpg", body, "image/jpeg")},
        data={"part_id": "M-9", "station": "st-2"},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert r.json()["part_id"] == "M-9" and r.json()["station"] == "st-2" and r.json()["verdict"] == "pass"
    r = client.post(
        "/v1/inspect",
        content=body,
        headers={**AUTH, "Content-Type": "application/octet-stream", "X-Part-Id": "H-1", "X-Station": "st-3"},
    )
    assert r.status_code == 200 and r.json()["part_id"] == "H-1" and r.json()["station"] == "st-3"


@pytest.mark.parametrize("name", list(bad_inputs()))
def test_bad_input_is_held_with_reason_and_logged(client, name):
    body, ctype, status, reason = bad_inputs()[name]
    r = _post(client, body, ctype, part=f"bad-{name}")
    assert r.status_code == status, r.text
    j = r.json()
    assert j["reason"] == reason and j["detail"]
    assert j["result"]["verdict"] == "review" and j["result"]["defect_score"] is None
    stored = client.rt.store.get_inspection(j["result"]["request_id"])
    assert stored is not None and stored.verdict == "review" and stored.part_id == f"bad-{name}"
    assert stored.reason.startswith(reason) and stored.defect_score is None


def test_request_level_bad_inputs_are_held(client):
    # multipart without a file field
    r = client.post("/v1/inspect", data={"part_id": "M-1"}, files={"other": ("x", b"abc")}, headers=AUTH)
    assert r.status_code == 400 and r.json()["reason"] == "missing_file"
    # no part id anywhere
    r = client.post("/v1/inspect", content=encode_jpeg(sample_frame()), headers={**AUTH, "Content-Type": "image/jpeg"})
    assert r.status_code == 400 and r.json()["reason"] == "missing_part_id"
    # a part id with control characters
    r = _post(client, encode_jpeg(sample_frame()), part="bad\nid")
    assert r.status_code == 400 and r.json()["reason"] == "bad_field"
    # two files where one is allowed
    two = [("file", ("a.jpg", b"\xff\xd8\xff", "image/jpeg")), ("file", ("b.jpg", b"\xff\xd8\xff", "image/jpeg"))]
    r = client.post("/v1/inspect", files=two, data={"part_id": "M-2"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["reason"] == "bad_multipart"
    assert client.rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"
    assert client.rt.store.count_by_verdict() == {"pass": 0, "review": 4, "reject": 0}


def test_body_over_limit_refused_before_buffering(tmp_path):
    cfg = _config(tmp_path, max_image_bytes=10_000)
    app, rt = _app(tmp_path, config=cfg)
    with TestClient(app) as c:
        r = _post(c, b"\xff\xd8\xff" + b"\x00" * 20_000)
        assert r.status_code == 413 and r.json()["reason"] == "too_large_file"
        assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"


def _png16(h, w, value16):
    img = np.full((h, w, 3), value16, np.uint16)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("png16", lambda: _png16(64, 80, 40_000)),
        ("rgba", lambda: cv2.imencode(".png", np.dstack([sample_frame(200), np.full((96, 96), 255, np.uint8)]))[1]),
        ("grey", lambda: cv2.imencode(".png", sample_frame(90)[:, :, 0])[1]),
        ("non_square", lambda: encode_jpeg(sample_frame(60, 48, 300))),
        ("bmp", lambda: cv2.imencode(".bmp", sample_frame(220))[1]),
        ("tiff", lambda: cv2.imencode(".tiff", sample_frame(120))[1]),
    ],
)
def test_unusual_valid_images_are_inspected(client, name, make):
    body = bytes(make())
    r = _post(client, body, "application/octet-stream", part=name)
    assert r.status_code == 200, r.text
    expected = decode_image(body).mean() / 255  # what the model must have seen: RGB uint8 of the same picture
    assert r.json()["defect_score"] == pytest.approx(expected, abs=1e-5)
    assert client.rt.store.get_inspection(r.json()["request_id"]).defect_score == r.json()["defect_score"]


def test_results_endpoint(client):
    r = _post(client, encode_jpeg(sample_frame(250)))
    rid = r.json()["request_id"]
    got = client.get(f"/v1/results/{rid}", headers=AUTH)
    assert got.status_code == 200 and got.json() == r.json()
    assert client.get("/v1/results/nope", headers=AUTH).status_code == 404
    assert client.get(f"/v1/results/{rid}").status_code == 401


def test_health_ready_metrics_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "fake-1"
    _post(client, encode_jpeg(sample_frame(250)))
    _post(client, b"", part="empty")
    text = client.get("/metrics").text
    assert 'inspection_runner_verdicts_total{source="http",verdict="reject"} 1.0' in text
    assert 'inspection_runner_errors_total{kind="empty"} 1.0' in text
    assert "inspection_runner_latency_seconds_bucket" in text and "inspection_runner_queue_depth" in text
    spec = client.get("/openapi.json").json()
    assert "/v1/inspect" in spec["paths"] and "/v1/results/{request_id}" in spec["paths"]


def test_not_ready_without_model_holds_parts(tmp_path):
    app, rt = _app(tmp_path, model=False)
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 503
        r = _post(c, encode_jpeg(sample_frame(10)))
        assert r.status_code == 503 and r.json()["reason"] == "no_model"
        assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"


def test_model_error_and_timeout_are_503_review(tmp_path):
    app, rt = _app(tmp_path, fail=True)
    with TestClient(app) as c:
        r = _post(c, encode_jpeg(sample_frame(10)))
        assert r.status_code == 503 and r.json()["reason"] == "model_error"
        assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"
    cfg = _config(tmp_path / "b", batching=BatchingConfig(timeout_s=0.2))
    app, rt = _app(tmp_path / "b", config=cfg, delay_s=1.0)
    with TestClient(app) as c:
        r = _post(c, encode_jpeg(sample_frame(10)))
        assert r.status_code == 503 and r.json()["reason"] == "timeout"
        assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"


def test_timed_out_part_is_held_once_and_its_late_verdict_is_not_stored(tmp_path):
    cfg = _config(tmp_path, batching=BatchingConfig(timeout_s=0.2))
    app, rt = _app(tmp_path, config=cfg, delay_s=0.6)
    with TestClient(app) as c:
        r = _post(c, encode_jpeg(sample_frame(250)))
        assert r.status_code == 503 and r.json()["reason"] == "timeout"
        time.sleep(0.8)  # the model answers late: the worker must leave the held decision alone
        assert rt.store.count() == 1
        assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"
        assert 'inspection_runner_errors_total{kind="store"}' not in c.get("/metrics", headers=AUTH).text


def test_verdict_being_stored_when_the_timeout_fires_is_answered_not_held(tmp_path):
    """The model was in time but the store write straddles the timeout: the worker owns the part, so the answer
    is its stored verdict (a second, `review` decision for the same part would contradict it)."""
    cfg = _config(tmp_path, batching=BatchingConfig(timeout_s=0.2))
    app, rt = _app(tmp_path, config=cfg)
    record_many = rt.store.record_many

    def slow(decisions, **kw):
        time.sleep(0.5)
        record_many(decisions, **kw)

    rt.store.record_many = slow
    with TestClient(app) as c:
        r = _post(c, encode_jpeg(sample_frame(250)))
        assert r.status_code == 200 and r.json()["verdict"] == "reject"
        assert rt.store.count() == 1 and rt.store.get_inspection(r.json()["request_id"]).verdict == "reject"


def test_store_failure_answers_503_review_and_the_part_is_held(tmp_path):
    app, rt = _app(tmp_path)

    def broken(decisions, **kw):
        raise OSError("disk full")

    rt.store.record_many = broken
    with TestClient(app) as c:
        r = _post(c, encode_jpeg(sample_frame(10)))  # a clear pass for the model
        assert r.status_code == 503
        body = r.json()
        assert body["reason"] == "store_error" and body["result"]["verdict"] == "review"
        assert rt.store.count() == 0
        assert 'inspection_runner_errors_total{kind="store"} 1.0' in c.get("/metrics", headers=AUTH).text


def test_auth(tmp_path, monkeypatch):
    body = encode_jpeg(sample_frame(10))
    cfg = _config(tmp_path, auth=AuthConfig(token=TOKEN, metrics=True, health=True))
    app, rt = _app(tmp_path, config=cfg)
    with TestClient(app) as c:
        no = c.post("/v1/inspect", content=body, headers={"Content-Type": "image/jpeg"}, params={"part_id": "a"})
        assert no.status_code == 401
        wrong = c.post(
            "/v1/inspect",
            content=body,
            headers={"Content-Type": "image/jpeg", "Authorization": "Bearer nope"},
            params={"part_id": "a"},
        )
        assert wrong.status_code == 403
        assert rt.store.count() == 0  # refused requests leave nothing behind
        assert c.post("/v1/admin/reload").status_code == 401
        assert c.get("/metrics").status_code == 401 and c.get("/healthz").status_code == 401
        assert c.get("/metrics", headers=AUTH).status_code == 200
        assert _post(c, body).status_code == 200
    # the environment wins over the file
    monkeypatch.setenv("INSPECTION_RUNNER_TOKEN", "from-env")
    app, rt = _app(tmp_path / "env")
    with TestClient(app) as c:
        assert _post(c, body).status_code == 403
        ok = _post(c, body, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200


def test_auth_required_without_token_refuses_to_start(tmp_path):
    from inspection.errors import ConfigError

    with pytest.raises(ConfigError, match="INSPECTION_RUNNER_TOKEN"):
        Runtime.build(RunnerConfig(store=str(tmp_path / "s")))


@pytest.mark.parametrize(
    ("override", "match"),
    [("spinning=sometimes", "spinning: got 'sometimes'"), ("batching.workers=0", "batching.workers must be")],
)
def test_bad_runner_settings_are_refused_with_the_field_named(override, match):
    from inspection.config import load_config
    from inspection.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(RunnerConfig, None, [override])


def test_concurrent_requests_are_micro_batched_and_all_logged(tmp_path):
    app, rt = _app(tmp_path, delay_s=0.03)
    frames = [encode_jpeg(sample_frame(v)) for v in (10, 140, 250, 30)]
    writes: list[int] = []
    record_many = rt.store.record_many

    def counted(decisions, **kw):
        writes.append(len(decisions))
        record_many(decisions, **kw)

    rt.store.record_many = counted
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:

        def one(i: int) -> dict:
            r = http.post(
                "/v1/inspect",
                content=frames[i % 4],
                headers={"Content-Type": "image/jpeg"},
                params={"part_id": f"c-{i}"},
            )
            assert r.status_code == 200, r.text
            return r.json()

        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(64)))
    model = rt.holder.current.model
    assert sum(model.batch_sizes) == 64
    assert max(model.batch_sizes) > 1  # requests that arrived together shared a model call
    # each batch was stored in one transaction, by the worker, before its answers went out
    assert sorted(writes) == sorted(model.batch_sizes)
    assert len({a["request_id"] for a in answers}) == 64
    for a in answers:
        assert rt.store.get_inspection(a["request_id"]).verdict == a["verdict"]
