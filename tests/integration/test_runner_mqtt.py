"""Each verdict reaches a subscriber on a real Mosquitto broker (QoS 1, topic inspection/<station>/verdict)."""

from __future__ import annotations

import queue

import paho.mqtt.client as mqtt
from fastapi.testclient import TestClient

from inspection.images import encode_jpeg
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, MqttConfig
from inspection.schemas import InspectionResult
from tests.fixtures.serving import fake_inferencer, sample_frame


def test_verdicts_published_to_real_broker(tmp_path, mosquitto_broker):
    host, port = mosquitto_broker
    received: queue.Queue = queue.Queue()
    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="test-plc")
    subscribed = queue.Queue()
    sub.on_message = lambda c, u, msg: received.put((msg.topic, msg.qos, msg.payload))
    sub.on_subscribe = lambda c, u, mid, rc, props: subscribed.put(rc)
    sub.connect(host, port)
    sub.loop_start()
    sub.subscribe("inspection/+/verdict", qos=1)
    subscribed.get(timeout=10)

    cfg = RunnerConfig(
        store=str(tmp_path / "store"),
        station="line4",
        auth=AuthConfig(required=False),
        mqtt=MqttConfig(host=host, port=port),
    )
    rt = Runtime.build(cfg)
    rt.holder.swap(fake_inferencer())
    try:
        with TestClient(create_app(cfg, rt)) as c:
            ok = c.post(
                "/v1/inspect",
                content=encode_jpeg(sample_frame(250)),
                headers={"Content-Type": "image/jpeg"},
                params={"part_id": "M-1"},
            )
            bad = c.post(
                "/v1/inspect",
                content=b"junk",
                headers={"Content-Type": "image/jpeg"},
                params={"part_id": "M-2", "station": "line5"},
            )
            msgs = [received.get(timeout=10), received.get(timeout=10)]
    finally:
        sub.loop_stop()
        sub.disconnect()
    by_topic = {t: (qos, InspectionResult.model_validate_json(p)) for t, qos, p in msgs}
    qos, first = by_topic["inspection/line4/verdict"]
    assert qos == 1 and first.request_id == ok.json()["request_id"] and first.verdict == "reject"
    qos, held = by_topic["inspection/line5/verdict"]
    assert held.verdict == "review" and held.request_id == bad.json()["result"]["request_id"]
    assert "inspection_runner_mqtt_published_total 2.0" in rt.metrics.render().decode()
