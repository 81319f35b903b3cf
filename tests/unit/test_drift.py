"""Drift monitor: quiet on in-distribution traffic, firing on shifted traffic; reference round trip; metrics."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from inspection.drift import (
    REFERENCE_FILE,
    DriftConfig,
    DriftMonitor,
    DriftReference,
    compute_reference,
    image_stats,
    psi,
)
from inspection.errors import ConfigError, DataError


def frame(rng, brightness=120.0, contrast=40.0, size=48):
    """A camera-like frame: a given mean grey level and spread."""
    grey = np.clip(rng.normal(brightness, contrast, (size, size)), 0, 255)
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)


def line_traffic(rng, n, brightness=120.0, contrast=40.0, score_shift=0.0):
    """n parts like the training data: varied brightness, 30 % defects with high scores."""
    for _ in range(n):
        defect = rng.random() < 0.3
        score = float(np.clip(rng.beta(8, 2) if defect else rng.beta(1, 12), 0, 1))
        score = float(np.clip(score + score_shift, 0, 1))
        verdict = "reject" if score >= 0.6 else "review" if score >= 0.3 else "pass"
        yield frame(rng, rng.normal(brightness, 8), rng.normal(contrast, 4)), score, verdict


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    images, scores, verdicts = zip(*line_traffic(rng, 600), strict=True)
    return compute_reference(images, scores, verdicts, source="test")


def test_quiet_on_in_distribution_traffic(reference):
    fired = []
    monitor = DriftMonitor(reference, DriftConfig(window=400, min_observations=200), callbacks=[fired.append])
    assert monitor.index()["max"] is None  # not ready: no verdict on too few parts
    for image, score, verdict in line_traffic(np.random.default_rng(1), 1000):
        monitor.observe(image, score, verdict)
        assert not monitor.alarm
    idx = monitor.index()
    assert idx["ready"] and idx["n"] == 400
    assert idx["max"] < 0.1
    assert fired == [] and monitor.alarms == 0


@pytest.mark.parametrize(
    ("shift", "worst"),
    [
        ({"brightness": 70.0}, {"brightness"}),  # night shift: darker
        ({"contrast": 15.0}, {"contrast"}),  # worse lens: contrast loss
        ({"score_shift": 0.35}, {"score", "verdict"}),  # the model's scores creep up, and with them the rejects
    ],
)
def test_fires_on_shifted_traffic(reference, shift, worst):
    fired = []
    monitor = DriftMonitor(reference, DriftConfig(window=400, min_observations=200), callbacks=[fired.append])
    rng = np.random.default_rng(2)
    for image, score, verdict in line_traffic(rng, 300):
        monitor.observe(image, score, verdict)
    assert not monitor.alarm
    for image, score, verdict in line_traffic(rng, 400, **shift):
        monitor.observe(image, score, verdict)
    assert monitor.alarm and monitor.alarms == 1
    assert len(fired) == 1  # cooldown: one callback per hour however long it stays drifted
    assert fired[0]["worst"] in worst and fired[0]["max"] >= 0.25
    # back to normal traffic: the alarm clears once the window has turned over
    for image, score, verdict in line_traffic(rng, 400):
        monitor.observe(image, score, verdict)
    assert not monitor.alarm


def test_callback_fires_again_after_cooldown(reference):
    now = [0.0]
    fired = []
    config = DriftConfig(window=100, min_observations=50, cooldown_s=60)
    monitor = DriftMonitor(reference, config, callbacks=[fired.append], clock=lambda: now[0])
    rng = np.random.default_rng(3)
    for image, score, verdict in line_traffic(rng, 100, brightness=60.0):
        monitor.observe(image, score, verdict)
    assert len(fired) == 1
    now[0] = 61.0
    monitor.observe(*next(line_traffic(rng, 1, brightness=60.0)))
    assert len(fired) == 2


def test_failing_callback_does_not_break_observe(reference):
    def broken(index):
        raise RuntimeError("prefect is down")

    monitor = DriftMonitor(reference, DriftConfig(window=50, min_observations=20), callbacks=[broken])
    for image, score, verdict in line_traffic(np.random.default_rng(4), 60, brightness=50.0):
        monitor.observe(image, score, verdict)
    assert monitor.alarm


def test_warm_up_reference_and_model_dir(tmp_path, reference):
    config = DriftConfig(window=100, min_observations=50, warmup=200)
    monitor = DriftMonitor.for_model_dir(tmp_path, config)  # no reference file: warm-up
    rng = np.random.default_rng(5)
    for image, score, verdict in line_traffic(rng, 200):
        monitor.observe(image, score, verdict)
    assert monitor.reference is not None and monitor.reference.n == 200
    for image, score, verdict in line_traffic(rng, 100, brightness=60.0):
        monitor.observe(image, score, verdict)
    assert monitor.alarm
    reference.save(tmp_path / REFERENCE_FILE)
    loaded = DriftMonitor.for_model_dir(tmp_path, config).reference
    assert loaded == reference


def test_reference_file_errors_are_clear(tmp_path):
    (tmp_path / REFERENCE_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        DriftMonitor.for_model_dir(tmp_path)
    with pytest.raises(DataError, match="needs edges"):
        DriftReference.from_dict({"edges": {}})
    with pytest.raises(DataError, match=">= 20 images"):
        compute_reference([frame(np.random.default_rng(0))] * 3, [0.1] * 3)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="warn <= alarm"):
        DriftConfig(warn_level=0.3, alarm_level=0.2)
    with pytest.raises(ConfigError, match="min_observations"):
        DriftConfig(window=100, min_observations=200)


def test_psi_and_image_stats():
    assert psi(np.array([10, 10, 10]), [1 / 3] * 3) == pytest.approx(0.0)
    assert psi(np.array([30, 0, 0]), [1 / 3] * 3) > 1.0  # empty bins are floored, not infinite
    big = np.full((4000, 3000, 3), 128, dtype=np.uint8)
    b, c = image_stats(big)
    assert b == pytest.approx(128 / 255, abs=1e-3) and c == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DataError, match=r"\(H, W, 3\)"):
        image_stats(np.zeros((10, 10), dtype=np.uint8))


def test_parts_without_a_score_are_skipped(reference):
    monitor = DriftMonitor(reference, DriftConfig(window=50, min_observations=20))
    monitor.observe(None, None, "review")
    monitor.observe(frame(np.random.default_rng(0)), None, "review")
    assert monitor.observed == 0


def test_metrics_exposition(reference):
    monitor = DriftMonitor(reference, DriftConfig(window=50, min_observations=20))
    for image, score, verdict in line_traffic(np.random.default_rng(6), 30):
        monitor.observe(image, score, verdict)
    lines = monitor.prometheus_lines()
    assert 'inspection_drift_psi{quantity="brightness"}' in "\n".join(lines)
    assert any(line.startswith("inspection_drift_alarm ") for line in lines)
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    registry.register(monitor.prometheus_collector())
    text = prometheus_client.generate_latest(registry).decode()
    assert "inspection_drift_index" in text and 'quantity="score"' in text


def test_drift_module_does_not_import_torch():
    import subprocess

    code = "import sys, inspection.drift; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_prefect_trigger_starts_the_deployment_without_blocking(monkeypatch, reference):
    import threading
    import types

    calls = []
    done = threading.Event()

    def run_deployment(name, parameters, timeout):
        calls.append((name, parameters, timeout))
        done.set()
        return types.SimpleNamespace(id="run-1")

    fake = types.ModuleType("prefect.deployments")
    fake.run_deployment = run_deployment
    monkeypatch.setitem(sys.modules, "prefect.deployments", fake)
    config = DriftConfig(window=50, min_observations=20, trigger_deployment="adapt/line-1", trigger_parameters={"x": 1})
    monitor = DriftMonitor(reference, config)
    for image, score, verdict in line_traffic(np.random.default_rng(7), 40, brightness=50.0):
        monitor.observe(image, score, verdict)
    assert done.wait(5)
    assert calls == [("adapt/line-1", {"x": 1}, 0)]
