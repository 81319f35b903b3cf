"""Publish each verdict to the line over MQTT (paho-mqtt 2.x, QoS 1, topic `<prefix>/<station>/verdict`).

The client runs its own network thread and reconnects by itself; messages published while the broker is away
are queued by paho and sent on reconnect (QoS 1: at least once, the PLC side de-duplicates by request_id).
Publishing never blocks or fails a request: the decision is already in the store, MQTT is a notification.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt

from inspection.runner.config import MqttConfig
from inspection.runner.metrics import RunnerMetrics
from inspection.schemas import InspectionResult

logger = logging.getLogger(__name__)


def verdict_topic(prefix: str, station: str) -> str:
    return f"{prefix.rstrip('/')}/{station}/verdict"


class MqttPublisher:
    def __init__(self, config: MqttConfig, station: str, metrics: RunnerMetrics | None = None):
        if not config.host:
            raise ValueError("MqttPublisher needs mqtt.host; leave MQTT off by not creating one")
        self.config = config
        self.station = station
        self.metrics = metrics
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id or f"inspection-runner-{station}",
            clean_session=False,  # the broker keeps our QoS 1 state across reconnects
        )
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        self.client.max_queued_messages_set(10_000)  # bounded: a long broker outage must not eat the memory
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.connected = False

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = not reason_code.is_failure
        log = logger.info if self.connected else logger.error
        log("MQTT %s:%s connect: %s", self.config.host, self.config.port, reason_code)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = False
        logger.warning("MQTT %s:%s disconnected: %s", self.config.host, self.config.port, reason_code)

    def start(self) -> None:
        # connect_async: a broker that is down at start-up must not stop the runner from serving HTTP
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def publish(self, result: InspectionResult) -> None:
        topic = verdict_topic(self.config.topic_prefix, result.station)
        try:
            info = self.client.publish(topic, result.model_dump_json(), qos=self.config.qos)
        except Exception:  # paho raises on a full queue or a bad topic; the decision is stored regardless
            logger.exception("MQTT publish of %s failed", result.request_id)
            if self.metrics is not None:
                self.metrics.errors.labels("mqtt").inc()
            return
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued until reconnect
            logger.error("MQTT publish of %s refused: %s", result.request_id, mqtt.error_string(info.rc))
            if self.metrics is not None:
                self.metrics.errors.labels("mqtt").inc()
        elif self.metrics is not None:
            self.metrics.mqtt_published.inc()
