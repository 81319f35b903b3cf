"""Drift on the line, end to end: parts sent over HTTP to a running runner move its drift index on /metrics."""

from __future__ import annotations

import re

import httpx
import numpy as np

from inspection.config import load_config
from inspection.images import encode_png
from inspection.runner import RunnerConfig, create_app
from inspection.synth import render_part
from tests.fixtures.serving import serve_in_thread

HEADERS = {"Authorization": "Bearer drift-token", "Content-Type": "image/png"}


def _parts(seed: int, n: int, shift: bool) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, _ = render_part(np.random.default_rng([seed, i]), defect=bool(i % 2))
        if shift:  # night shift: much darker, with sensor noise
            noisy = image.astype(np.float32) * 0.45 + rng.normal(0, 12, image.shape)
            image = np.clip(noisy, 0, 255).astype(np.uint8)
        out.append(encode_png(image))
    return out


def _drift(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", headers=HEADERS).text
    return {
        name: float(value)
        for name, value in re.findall(r"^(inspection_drift_(?:index|alarm|window_parts))\s+(\S+)$", text, re.M)
    }


def test_drift_quiet_in_distribution_and_fires_on_shifted_traffic(tiny_registry, tmp_path) -> None:
    overrides = [
        f"registry={tiny_registry}",
        f"store={tmp_path / 'store'}",
        "auth.token=drift-token",
        "drift.warmup=100",  # the tiny registry has no drift_reference.json: the first parts are the reference
        "drift.window=100",
        "drift.min_observations=80",
    ]
    config = load_config(RunnerConfig, None, overrides)
    with serve_in_thread(create_app(config)) as base, httpx.Client(timeout=30) as client:
        for _ in range(300):
            if client.get(f"{base}/readyz").status_code == 200:
                break
            __import__("time").sleep(0.1)
        for i, body in enumerate(_parts(1, 100, shift=False) + _parts(2, 100, shift=False)):
            r = client.post(f"{base}/v1/inspect", params={"part_id": f"in-{i}"}, content=body, headers=HEADERS)
            assert r.status_code == 200
        quiet = _drift(base)
        assert quiet["inspection_drift_window_parts"] == 100
        assert quiet["inspection_drift_alarm"] == 0.0 and quiet["inspection_drift_index"] < 0.25, quiet
        for i, body in enumerate(_parts(3, 100, shift=True)):
            r = client.post(f"{base}/v1/inspect", params={"part_id": f"night-{i}"}, content=body, headers=HEADERS)
            assert r.status_code == 200
        shifted = _drift(base)
        assert shifted["inspection_drift_alarm"] == 1.0, shifted
        assert shifted["inspection_drift_index"] > 0.25 > quiet["inspection_drift_index"]
