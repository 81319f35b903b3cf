"""A scheduled deployment against a real `prefect server start`, served by deploy/serve_flows.py and triggered once.

Bounded in time; every process it starts is stopped (SIGTERM, then SIGKILL) when the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.serving import free_port

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_scheduled_ingest_deployment_runs_on_a_real_server(tmp_path: Path, synth_dir: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect_home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
    store = tmp_path / "store"
    spec = {
        "deployments": {
            "ingest": {
                "flow": "flows.ingest_flow:ingest_flow",
                "cron": "0 * * * *",
                "parameters": {"sources": [str(synth_dir)], "store": str(store)},
            }
        }
    }
    spec_file = tmp_path / "deployments.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = _start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "srv.log")
    serve = None
    try:
        _wait(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, 180, server, tmp_path / "srv.log")
        serve = _start([sys.executable, "deploy/serve_flows.py", "--file", str(spec_file)], env, tmp_path / "serve.log")

        def deployment() -> dict | None:
            r = httpx.post(f"{api}/deployments/filter", json={}, timeout=5)
            items = [d for d in r.json() if d["name"] == "ingest"]
            return items[0] if items else None

        _wait(lambda: deployment() is not None, 120, serve, tmp_path / "serve.log")
        dep = deployment()
        schedules = dep.get("schedules") or []
        assert any(s["schedule"].get("cron") == "0 * * * *" for s in schedules), dep
        assert not dep.get("paused", False)
        # the scheduler has created upcoming runs for the cron schedule
        _wait(
            lambda: httpx.post(
                f"{api}/flow_runs/filter",
                json={
                    "deployments": {"id": {"any_": [dep["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                },
                timeout=5,
            ).json(),
            60,
            serve,
            tmp_path / "serve.log",
        )
        r = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={}, timeout=10)
        assert r.status_code in (200, 201), r.text
        run_id = r.json()["id"]

        def state() -> str:
            return httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]

        _wait(lambda: state() in ("COMPLETED", "FAILED", "CRASHED"), 240, serve, tmp_path / "serve.log")
        assert state() == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        assert (store / "manifest.sqlite").is_file()
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
    assert server.poll() is not None and (serve is None or serve.poll() is not None)


def _wait(predicate, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if predicate():
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s: {log.read_text()[-3000:]}")
