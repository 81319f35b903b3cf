"""The runner end to end with a real exported model from a real registry: load, verify, serve, swap, no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from inspection.images import decode_image, encode_jpeg
from inspection.runner import Runtime, create_app
from tests.fixtures.serving import sample_frame

REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _frames():
    return [sample_frame(v, 96, 96) for v in (20, 120, 220)] + [sample_frame(60, 70, 110)]


def test_real_model_served_with_scores_equal_to_onnx(tiny_registry, registry_runner_config):
    from inspection.onnx_infer import OnnxModel
    from inspection.registry import Registry

    cfg = registry_runner_config(tiny_registry, TOKEN, station="e2e")
    rt = Runtime.build(cfg)
    with TestClient(create_app(cfg, rt)) as c:
        assert rt.wait_ready(120), rt.swapper.last_error
        ready = c.get("/readyz").json()
        version = Registry(tiny_registry).alias("production")
        assert ready["ready"] and ready["model_version"] == version and ready["provider"] == "CPUExecutionProvider"
        mv = Registry(tiny_registry).get(version)
        ref = OnnxModel(mv.model_path)
        for i, frame in enumerate(_frames()):
            body = encode_jpeg(frame)
            r = c.post(
                "/v1/inspect", content=body, headers={**AUTH, "Content-Type": "image/jpeg"}, params={"part_id": f"e{i}"}
            )
            assert r.status_code == 200, r.text
            expected = float(ref.predict(decode_image(body)[None])[0][0])
            assert r.json()["defect_score"] == pytest.approx(expected, abs=1e-6)
            assert r.json()["model_version"] == version
            assert r.json()["thresholds"] == mv.card.thresholds.model_dump()
            assert rt.store.get_inspection(r.json()["request_id"]) is not None
        assert f'version="{version}"' in c.get("/metrics").text


def test_serving_does_not_import_torch(tmp_path, tiny_registry):
    """In a fresh interpreter: import the runner, serve a real request, then check sys.modules."""
    code = f"""
import json, sys, time
from fastapi.testclient import TestClient
from inspection.images import encode_jpeg
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig
import numpy as np
cfg = RunnerConfig(registry={str(tiny_registry)!r}, store={str(tmp_path / "s")!r}, threads=1,
                   auth=AuthConfig(required=False))
rt = Runtime.build(cfg)
with TestClient(create_app(cfg, rt)) as c:
    assert rt.wait_ready(120), rt.swapper.last_error
    img = np.full((80, 80, 3), 90, np.uint8)
    r = c.post("/v1/inspect", content=encode_jpeg(img), headers={{"Content-Type": "image/jpeg"}},
               params={{"part_id": "nt"}})
    bad = c.post("/v1/inspect", content=b"junk", headers={{"Content-Type": "image/jpeg"}}, params={{"part_id": "b"}})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision", "albumentations")
               or m.startswith(("inspection.models", "inspection.train", "inspection.export")))
print(json.dumps({{"status": r.status_code, "verdict": r.json()["verdict"], "bad": bad.status_code,
                  "heavy": heavy}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == 200 and result["verdict"] in ("pass", "review", "reject")
    assert result["bad"] == 415
    assert result["heavy"] == []


def test_cli_inspect_prints_json_lines(tmp_path, tiny_registry):
    good = tmp_path / "good.jpg"
    good.write_bytes(encode_jpeg(sample_frame(100)))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xffnot really")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inspection.cli",
            "runner",
            "inspect",
            str(good),
            str(bad),
            "--registry",
            str(tiny_registry),
            "--station",
            "cli",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(x) for x in out.stdout.strip().splitlines()]
    assert [x["part_id"] for x in lines] == ["good", "bad"]
    assert lines[0]["defect_score"] is not None and lines[1]["verdict"] == "review"
    assert lines[1]["reason"].startswith("truncated")


def test_cli_serve_starts_and_answers(tmp_path, tiny_registry):
    from tests.fixtures.serving import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "INSPECTION_RUNNER_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inspection.cli",
            "runner",
            "serve",
            "--registry",
            str(tiny_registry),
            "--station",
            "cli-st",
            "--port",
            str(port),
            "--store",
            str(tmp_path / "store"),
            "--config",
            str(REPO / "configs" / "runner.yaml"),
            "--set",
            "threads=1",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    import httpx

    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/inspect",
            content=encode_jpeg(sample_frame(50)),
            headers={**AUTH, "Content-Type": "image/jpeg"},
            params={"part_id": "x"},
        )
        assert r.status_code == 200 and r.json()["station"] == "cli-st"
        # the serving process has no torch library mapped
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps
    finally:
        proc.terminate()
        proc.wait(20)
    assert np.isfinite(r.json()["defect_score"])


def _second_version(tiny_registry: Path, tmp_path: Path, broken: str | None = None) -> str:
    """Register a second version (a copy of production's export under a new version name) and promote it."""
    import shutil

    from inspection.registry import Registry
    from inspection.schemas import ModelCard

    reg = Registry(tiny_registry)
    current = reg.get(reg.alias("production"))
    export = tmp_path / f"export-{broken or 'ok'}"
    shutil.copytree(current.dir, export)
    card = ModelCard.model_validate_json((export / "model_card.json").read_text())
    card = card.model_copy(update={"version": f"{card.version}-b{broken or 'ok'}", "parent_version": card.version})
    if broken == "wrong_contract":  # a valid ONNX file, honestly hashed, that is not an inspection model
        from inspection.onnx_infer import _smoke_model_bytes, sha256_file

        (export / "model.onnx").write_bytes(_smoke_model_bytes())
        card = card.model_copy(update={"files": {**card.files, "model.onnx": sha256_file(export / "model.onnx")}})
    (export / "model_card.json").write_text(card.model_dump_json(indent=2))
    version = reg.register(export)
    if broken == "wrong_contract":
        # the registry's own gate would refuse to promote it; the runner must also hold the line when the alias is
        # edited by hand (defence in depth), so point the alias at it directly
        aliases = json.loads((tiny_registry / "aliases.json").read_text())
        (tiny_registry / "aliases.tmp").write_text(json.dumps({**aliases, "production": version}))
        os.replace(tiny_registry / "aliases.tmp", tiny_registry / "aliases.json")
    else:
        reg.promote(version, reason="test", user="tester", force=True)
    if broken == "corrupt":  # bytes changed on disk after promotion: the sha256 check must refuse it
        path = reg.root / "versions" / version / "model.onnx"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return version


def test_hot_swap_under_concurrent_load_without_failures(tmp_path, tiny_registry, registry_runner_config):
    import concurrent.futures as cf
    import threading

    import httpx

    from tests.fixtures.serving import serve_in_thread

    cfg = registry_runner_config(tiny_registry, TOKEN, station="e2e")
    cfg = type(cfg)(**{**cfg.__dict__, "swap": type(cfg.swap)(poll_s=0.1)})
    rt = Runtime.build(cfg)
    app = create_app(cfg, rt)
    body = encode_jpeg(sample_frame(120))
    stop = threading.Event()
    with serve_in_thread(app) as url:
        assert rt.wait_ready(120)
        old = rt.holder.current.version

        def client(k: int) -> list[tuple[int, str | None]]:
            seen = []
            with httpx.Client(base_url=url, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=30) as h:
                i = 0
                while not stop.is_set():
                    r = h.post("/v1/inspect", content=body, params={"part_id": f"k{k}-{i}"})
                    seen.append((r.status_code, r.json().get("model_version")))
                    i += 1
            return seen

        with cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, k) for k in range(6)]
            time.sleep(0.5)
            new = _second_version(tiny_registry, tmp_path)
            deadline = time.time() + 120
            while rt.holder.current.version != new and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # keep the load on after the swap
            stop.set()
            answers = [a for f in futures for a in f.result()]
    statuses = {s for s, _ in answers}
    versions = [v for _, v in answers]
    assert statuses == {200}, f"failed requests during the swap: {statuses}"
    assert old in versions and new in versions
    assert rt.store.count() == len(answers)  # every request has its decision
    assert 'inspection_runner_model_swaps_total{outcome="swapped"}' in rt.metrics.render().decode()


@pytest.mark.parametrize("broken", ["corrupt", "wrong_contract"])
def test_broken_model_refused_old_keeps_serving(tmp_path, tiny_registry, broken, registry_runner_config):
    from inspection.runner.config import SwapConfig

    # no polling: the test decides when the runner looks (after the file is corrupted)
    cfg = registry_runner_config(tiny_registry, TOKEN, station="e2e", swap=SwapConfig(enabled=False))
    rt = Runtime.build(cfg)
    with TestClient(create_app(cfg, rt)) as c:
        assert rt.wait_ready(120)
        old = rt.holder.current.version
        bad = _second_version(tiny_registry, tmp_path, broken=broken)
        r = c.post("/v1/admin/reload", headers=AUTH)
        assert r.status_code == 200 and r.json()["outcome"] == "refused" and r.json()["version"] == old
        assert bad in r.json()["error"]
        ok = c.post(
            "/v1/inspect",
            content=encode_jpeg(sample_frame(80)),
            headers={**AUTH, "Content-Type": "image/jpeg"},
            params={"part_id": "after"},
        )
        assert ok.status_code == 200 and ok.json()["model_version"] == old
        metrics = c.get("/metrics").text
        assert 'inspection_runner_model_swaps_total{outcome="refused"} 1.0' in metrics


@pytest.mark.gpu
def test_gpu_providers_serve_when_present(tiny_registry, registry_runner_config):
    """GPU path: with a CUDA device the runner must really run on TensorRT or CUDA (auto-skipped without one)."""
    cfg = registry_runner_config(tiny_registry, TOKEN, station="e2e")
    rt = Runtime.build(cfg)
    with TestClient(create_app(cfg, rt)) as c:
        assert rt.wait_ready(600), rt.swapper.last_error
        assert rt.holder.current.provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        r = c.post(
            "/v1/inspect",
            content=encode_jpeg(sample_frame(80)),
            headers={**AUTH, "Content-Type": "image/jpeg"},
            params={"part_id": "gpu"},
        )
        assert r.status_code == 200
