"""The MQTT outbox against a real Mosquitto broker that goes away and comes back: no verdict lost, none reordered.

The broker is this test's own (it is stopped and started again on the same port); it keeps its sessions on disk
so the subscriber — a PLC/MES with a persistent QoS 1 session — gets what was published while it reconnected.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient

from inspection.images import encode_jpeg
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, MqttConfig
from inspection.schemas import InspectionResult
from tests.fixtures.serving import MOSQUITTO, fake_inferencer, free_port, sample_frame

pytestmark = pytest.mark.timeout(180)


class Broker:
    """A Mosquitto we can stop and start again on the same port, with its sessions persisted across the restart."""

    def __init__(self, folder: Path):
        if not Path(MOSQUITTO).exists():
            pytest.fail(f"mosquitto not found at {MOSQUITTO}: apt-get install mosquitto (CI installs it)")
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {folder}/\nmax_queued_messages 0\n"  # 0: no cap on a reconnecting subscriber
            # started as root, mosquitto drops to its own user, which cannot write our tmp folder: stay who we are
            f"user {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {self.proc.stdout.read().decode(errors='replace')}")
            time.sleep(0.05)
        pytest.fail("mosquitto did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto writes its persistence file, then exits
            self.proc.wait(10)
        self.proc = None


@pytest.fixture()
def broker(tmp_path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A consumer with a persistent session (clean_session=False): every QoS 1 message in arrival order."""

    def __init__(self, port: int):
        self.messages: list[InspectionResult] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="test-mes-outbox", clean_session=False
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("inspection/+/verdict", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rc, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(10)

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append(InspectionResult.model_validate_json(msg.payload))

    def first_seen(self) -> list[str]:
        """Request ids in the order they first arrived (QoS 1 may repeat one: consumers drop duplicates)."""
        with self.lock:
            ids = [m.request_id for m in self.messages]
        return list(dict.fromkeys(ids))

    def wait_for(self, n: int, timeout: float = 60) -> list[str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            seen = self.first_seen()
            if len(seen) >= n:
                return seen
            time.sleep(0.05)
        return self.first_seen()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _config(tmp_path, port: int) -> RunnerConfig:
    return RunnerConfig(
        store=str(tmp_path / "store"),
        station="line9",
        auth=AuthConfig(required=False),
        mqtt=MqttConfig(host="127.0.0.1", port=port, outbox_poll_s=0.1),
        drift_enabled=False,
    )


def _post(client: TestClient, part: str, value: int) -> str:
    r = client.post(
        "/v1/inspect",
        content=encode_jpeg(sample_frame(value)),
        headers={"Content-Type": "image/jpeg"},
        params={"part_id": part},
    )
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _backlog(metrics_text: str) -> float:
    line = next(ln for ln in metrics_text.splitlines() if ln.startswith("inspection_runner_mqtt_outbox_backlog "))
    return float(line.split()[-1])


def test_broker_down_during_a_stream_every_verdict_arrives_in_order(tmp_path, broker):
    sub = Subscriber(broker.port)
    cfg = _config(tmp_path, broker.port)
    rt = Runtime.build(cfg)
    rt.holder.swap(fake_inferencer())
    sent: list[str] = []
    stop_stream = threading.Event()
    backlog_seen: list[float] = []
    try:
        with TestClient(create_app(cfg, rt)) as c:

            def stream() -> None:  # one camera, parts one after another
                i = 0
                while not stop_stream.is_set():
                    sent.append(_post(c, f"S-{i:04d}", (10, 140, 250)[i % 3]))
                    i += 1
                    time.sleep(0.01)

            streamer = threading.Thread(target=stream)
            streamer.start()
            try:
                assert len(sub.wait_for(30, timeout=30)) >= 30  # flowing normally
                broker.stop()
                down_at = len(sent)
                time.sleep(2.0)  # the line keeps producing while the broker is away
                backlog_seen.append(_backlog(rt.metrics.render().decode()))
                broker.start()
                time.sleep(1.5)  # ... and after it is back
            finally:
                stop_stream.set()
                streamer.join(30)
            during = len(sent) - down_at
            received = sub.wait_for(len(sent), timeout=60)
            backlog_after = _backlog(c.get("/metrics").text)  # the gauge on /metrics
    finally:
        sub.close()
    assert during >= 20, "the stream must have gone on while the broker was down"
    assert backlog_seen[0] >= 10  # verdicts waited in the store's outbox
    assert received == sent  # every verdict, in the order given; duplicates (QoS 1) aside
    assert backlog_after == 0 and rt.store.outbox_count("line9") == 0


def test_verdicts_survive_a_runner_restart_while_the_broker_is_down(tmp_path, broker):
    sub = Subscriber(broker.port)
    broker.stop()
    cfg = _config(tmp_path, broker.port)
    try:
        rt = Runtime.build(cfg)
        rt.holder.swap(fake_inferencer())
        with TestClient(create_app(cfg, rt)) as c:
            sent = [_post(c, f"R-{i:03d}", (10, 250)[i % 2]) for i in range(25)]
            time.sleep(0.3)
            backlog = _backlog(c.get("/metrics").text)
        assert backlog == 25  # /metrics showed them waiting
        # the runner is gone (nothing of paho's memory survives); a new process finds the verdicts in the store
        rt2 = Runtime.build(cfg)
        rt2.holder.swap(fake_inferencer())
        assert rt2.store.outbox_count("line9") == 25
        broker.start()
        with TestClient(create_app(cfg, rt2)) as c:
            sent.append(_post(c, "R-after", 10))
            received = sub.wait_for(len(sent), timeout=60)
            deadline = time.time() + 10
            while rt2.store.outbox_count("line9") and time.time() < deadline:
                time.sleep(0.05)
            left = rt2.store.outbox_count("line9")
    finally:
        sub.close()
    assert received == sent  # the 25 from before the restart first, in order, then the new one
    assert left == 0
    with sub.lock:
        assert {m.verdict.value for m in sub.messages} == {"pass", "reject"}
