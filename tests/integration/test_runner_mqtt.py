"""Each verdict reaches a subscriber on a real Mosquitto broker (QoS 1, topic inspection/<station>/verdict)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from inspection.images import encode_jpeg
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, MqttConfig
from inspection.schemas import InspectionResult
from tests.fixtures.serving import fake_inferencer, sample_frame


def test_verdicts_published_to_real_broker(tmp_path, mosquitto_broker, mqtt_subscriber):
    host, port = mosquitto_broker
    received = mqtt_subscriber("inspection/+/verdict", "test-plc")

    cfg = RunnerConfig(
        store=str(tmp_path / "store"),
        station="line4",
        auth=AuthConfig(required=False),
        mqtt=MqttConfig(host=host, port=port),
    )
    rt = Runtime.build(cfg)
    rt.holder.swap(fake_inferencer())
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
    by_topic = {m.topic: (m.qos, InspectionResult.model_validate_json(m.payload)) for m in msgs}
    qos, first = by_topic["inspection/line4/verdict"]
    assert qos == 1 and first.request_id == ok.json()["request_id"] and first.verdict == "reject"
    qos, held = by_topic["inspection/line5/verdict"]
    assert held.verdict == "review" and held.request_id == bad.json()["result"]["request_id"]
    assert "inspection_runner_mqtt_published_total 2.0" in rt.metrics.render().decode()
