"""Faults against the real runner (bench/faults.py measures them at scale): SIGTERM on the `inspection runner
serve` process mid-stream, and a damaged model file that a matching sha256 cannot catch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from inspection.images import encode_jpeg
from tests.fixtures.serving import free_port, sample_frame

REPO = Path(__file__).resolve().parents[2]
TOKEN = "faults-it-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_sigterm_answers_in_flight_holds_new_parts_and_exits_in_time(tmp_path, tiny_registry):
    port = free_port()
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO), "INSPECTION_RUNNER_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "inspection.cli", "runner", "serve", "--registry", str(tiny_registry)]
    cmd += ["--station", "sig", "--port", str(port), "--store", str(store)]
    cmd += ["--config", str(REPO / "configs" / "runner.yaml"), "--set", "threads=1", "--set", "drain_s=1.0"]
    log = tmp_path / "runner.log"  # a file, not a pipe: a pipe nobody reads would block the runner's logging
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    answers: list[tuple[float, float, int | None, dict]] = []  # (sent, done, status, body)
    stop = threading.Event()
    body = encode_jpeg(sample_frame(90))

    def client(k: int) -> None:
        i = 0
        with httpx.Client(base_url=base, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=30) as h:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = h.post("/v1/inspect", content=body, params={"part_id": f"s{k}-{i}"})
                    answers.append((t0, time.perf_counter(), r.status_code, r.json()))
                except httpx.HTTPError:
                    answers.append((t0, time.perf_counter(), None, {}))
                    time.sleep(0.05)
                i += 1

    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with_model = False
            with contextlib.suppress(httpx.HTTPError):
                with_model = httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            if with_model:
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t_sig = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        exit_s = time.perf_counter() - t_sig
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 0, log.read_text()[-3000:]
    assert exit_s < 1.0 + 5.0 + 5.0, f"exit took {exit_s:.1f} s"  # drain + the timeout of in-flight parts + stop
    before = [a for a in answers if a[0] < t_sig - 0.05]  # 50 ms for the signal to reach the runner
    # in flight at SIGTERM (sent before it): answered with their verdicts
    assert before and all(a[2] == 200 for a in before), [(a[2], a[3].get("reason")) for a in before if a[2] != 200]
    after = [a for a in answers if a[0] >= t_sig]
    held = [a for a in after if a[2] == 503]
    assert held, f"no part sent after SIGTERM was held: {[a[2] for a in after]}"
    assert {a[3]["reason"] for a in held} == {"shutting_down"}
    assert all(a[2] in (503, None) for a in after)  # never a verdict once draining, no other error
    from inspection.decisions import DecisionStore

    decisions = DecisionStore(store)
    for _, _, status, doc in answers:  # every acknowledged decision is in the store, unchanged
        if status == 200:
            assert decisions.get_inspection(doc["request_id"]).verdict == doc["verdict"]
        elif status == 503:
            assert decisions.get_inspection(doc["result"]["request_id"]).verdict == "review"
    decisions.close()


def _damaged_copy(src: Path, dest: Path, version: str, reference: bool, damage: bool) -> Path:
    """A copy of a registered version's folder under a new name; optionally with smoke_reference.json of the
    good model, optionally with a quarter of its largest weight tensor zeroed (a valid ONNX file), hashed as is."""
    import onnx
    from onnx import numpy_helper

    from inspection.onnx_infer import OnnxModel
    from inspection.registry import sha256_file
    from inspection.runner.inferencer import REFERENCE_FILE, smoke_reference

    # the export's own reference (export writes one) is left behind: this test says which reference there is
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("registered.json", "SHA256SUMS", REFERENCE_FILE))
    card = json.loads((dest / "model_card.json").read_text())
    card["files"].pop(REFERENCE_FILE, None)
    if reference:
        good = OnnxModel(dest / "model.onnx", providers=["CPUExecutionProvider"], threads=1)
        ref = {"model.onnx": smoke_reference(good, int(card["preprocess"]["input_size"]))}
        (dest / REFERENCE_FILE).write_text(json.dumps(ref))
        card["files"][REFERENCE_FILE] = sha256_file(dest / REFERENCE_FILE)
    if damage:
        model = onnx.load(dest / "model.onnx")
        big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        values = numpy_helper.to_array(big).copy()
        values.reshape(-1)[: values.size // 4] = 0
        big.CopyFrom(numpy_helper.from_array(values, big.name))
        onnx.save(model, dest / "model.onnx")
    card["version"] = version
    card["files"]["model.onnx"] = sha256_file(dest / "model.onnx")
    (dest / "model_card.json").write_text(json.dumps(card, indent=2))
    return dest


@pytest.mark.parametrize("with_reference", [True, False])
def test_weights_damaged_before_hashing_are_refused_by_the_smoke_reference(
    tmp_path, tiny_registry, with_reference, registry_runner_config
):
    """A bad deploy: the model file lost some weights before it was hashed, so its sha256 matches and it still
    loads and gives sane-looking scores. Only the export's smoke reference tells it from the exported model."""
    from inspection.registry import Registry
    from inspection.runner import Runtime
    from inspection.runner.config import SwapConfig

    reg = Registry(tiny_registry)
    current = reg.get(reg.alias("production"))
    good = _damaged_copy(current.dir, tmp_path / "good", "good-ref", reference=with_reference, damage=False)
    bad = _damaged_copy(current.dir, tmp_path / "bad", "bad-weights", reference=with_reference, damage=True)
    if with_reference:
        shutil.copy(good / "smoke_reference.json", bad / "smoke_reference.json")  # the export's, of the good model
        card = json.loads((bad / "model_card.json").read_text())
        assert (
            card["files"]["smoke_reference.json"]
            == json.loads((good / "model_card.json").read_text())["files"]["smoke_reference.json"]
        )
    for folder in (good, bad):
        reg.register(folder, user="test")
    cfg = registry_runner_config(tiny_registry, TOKEN, swap=SwapConfig(enabled=False))
    rt = Runtime.build(cfg)
    try:
        reg.promote("good-ref", reason="test", user="test", force=True)
        assert rt.swapper.check() == "swapped" and rt.holder.current.version == "good-ref"
        reg.promote("bad-weights", reason="test: a bad deploy", user="test", force=True)
        outcome = rt.swapper.check()
        if with_reference:
            assert outcome == "refused" and rt.holder.current.version == "good-ref"
            assert "reference" in rt.swapper.refused["bad-weights"]
            assert any("bad-weights" in why for why in rt.degraded_reasons())
        else:  # without a reference the damaged file serves: why the export must record one
            assert outcome == "swapped" and rt.holder.current.version == "bad-weights"
    finally:
        rt.store.close()
