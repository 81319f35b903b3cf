"""Publish each verdict to the line over MQTT (paho-mqtt 2.x, QoS 1, topic `<prefix>/<station>/verdict`).

Verdicts are not handed to paho when they are decided: they wait in the decision store's outbox (outbox.py),
written in the same transaction as the decision. One relay thread publishes them oldest first, a window of
`mqtt.outbox_batch` at a time, and deletes each row once the broker has acknowledged it (PUBACK). So:
- broker down: nothing is published, the backlog grows in the store (`inspection_runner_mqtt_outbox_backlog`);
  when it returns the backlog goes out in the order the verdicts were given;
- connection lost inside a window: paho re-sends the unacknowledged messages of that window on reconnect, in
  order (QoS 1 session state), and the relay waits for their PUBACKs rather than publishing them again;
- runner restarted: rows not yet acknowledged are published again by the next process.
At least once, never lost: a consumer drops duplicates by the payload's `request_id`. Publishing never blocks or
fails a request: the decision is stored before the relay ever sees it.
"""

from __future__ import annotations

import logging
import threading
import time

import paho.mqtt.client as mqtt

from inspection.decisions import DecisionStore
from inspection.runner.config import MqttConfig
from inspection.runner.metrics import RunnerMetrics
from inspection.runner.outbox import Outbox, OutboxMessage
from inspection.schemas import InspectionResult

logger = logging.getLogger(__name__)

STOP_DRAIN_S = 2.0  # at shutdown, wait this long for PUBACKs of a window already sent (the rest stays queued)


def verdict_topic(prefix: str, station: str) -> str:
    return f"{prefix.rstrip('/')}/{station}/verdict"


class MqttPublisher:
    def __init__(self, config: MqttConfig, station: str, store: DecisionStore, metrics: RunnerMetrics | None = None):
        if not config.host:
            raise ValueError("MqttPublisher needs mqtt.host; leave MQTT off by not creating one")
        self.config = config
        self.station = station
        self.metrics = metrics
        self.outbox = Outbox(
            store,
            producer=station,
            topic_for=lambda r: verdict_topic(config.topic_prefix, r.station),
            max_rows=config.outbox_max_rows,
            metrics=metrics,
        )
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.client_id or f"inspection-runner-{station}",
            clean_session=False,  # the broker keeps our QoS 1 state across reconnects
        )
        if config.username:
            self.client.username_pw_set(config.username, config.password)
        self.client.max_inflight_messages_set(config.outbox_batch)  # a whole window on the wire at once
        self.client.max_queued_messages_set(0)  # bounded by the window; a refused message would break the order
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.connected = False
        self._acked: set[int] = set()  # mids acknowledged by the broker
        self._ack = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- paho callbacks (its network thread) ---------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = not reason_code.is_failure
        log = logger.info if self.connected else logger.error
        log("MQTT %s:%s connect: %s", self.config.host, self.config.port, reason_code)
        self._wake.set()  # a backlog may be waiting for this

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = False
        logger.warning("MQTT %s:%s disconnected: %s", self.config.host, self.config.port, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._ack:
            self._acked.add(mid)
            self._ack.notify_all()

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        # connect_async: a broker that is down at start-up must not stop the runner from serving
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="mqtt-outbox", daemon=True)
        self._thread.start()
        backlog = self.outbox.refresh()
        if backlog:
            logger.info("MQTT outbox: %d verdicts from before this start wait for the broker", backlog)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(STOP_DRAIN_S + 5)
            self._thread = None
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def notify(self, result: InspectionResult | None = None) -> None:
        """A decision (with its outbox row) was stored: wake the relay. Never blocks."""
        self._wake.set()

    # -- the relay -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before reading: a row stored after this wakes the next round
            try:
                backlog = self.outbox.refresh()
                if backlog and self.connected:
                    self._relay_window()
                    continue  # more may be waiting: no sleep while draining
            except Exception:  # the store or paho failed: the rows stay, try again after a pause
                logger.exception("MQTT outbox relay failed; retrying")
                if self.metrics is not None:
                    self.metrics.errors.labels("mqtt").inc()
                self._stop.wait(1.0)
            self._wake.wait(self.config.outbox_poll_s)

    def _relay_window(self) -> None:
        window = self.outbox.pending(self.config.outbox_batch)
        sent: list[tuple[OutboxMessage, int]] = []
        for msg in window:
            info = self.client.publish(msg.topic, msg.payload, qos=self.config.qos)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho sends it on reconnect
                logger.error("MQTT publish of %s refused: %s", msg.request_id, mqtt.error_string(info.rc))
                if self.metrics is not None:
                    self.metrics.errors.labels("mqtt").inc()
                break  # later rows wait: publishing them now would overtake this one
            sent.append((msg, info.mid))
            if self.metrics is not None:
                self.metrics.mqtt_published.inc()
        if self.config.qos == 0:  # no PUBACK will come: handed to the socket is all QoS 0 promises
            self.outbox.delivered([m for m, _ in sent])
            return
        self._await_acks(sent)

    def _await_acks(self, sent: list[tuple[OutboxMessage, int]]) -> None:
        """Delete each row as its PUBACK arrives; keep waiting across reconnects (paho re-sends the window)."""
        waiting = dict(sent)  # row -> mid, in publish order
        deadline = None
        last_log = last_refresh = time.monotonic()
        while waiting:
            with self._ack:
                done = [m for m, mid in waiting.items() if mid in self._acked]
                if not done:
                    self._ack.wait(0.2)
                    done = [m for m, mid in waiting.items() if mid in self._acked]
                for m in done:
                    self._acked.discard(waiting.pop(m))
            if done:
                self.outbox.delivered(done)
            if time.monotonic() - last_refresh > self.config.outbox_poll_s:  # the gauge moves during an outage too
                last_refresh = time.monotonic()
                self.outbox.refresh()
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + STOP_DRAIN_S
                if time.monotonic() > deadline:
                    logger.info("MQTT outbox: %d verdicts unacknowledged at shutdown stay queued", len(waiting))
                    return
            elif time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                logger.warning(
                    "MQTT outbox: %d published verdicts wait for their PUBACK (connected: %s)",
                    len(waiting),
                    self.connected,
                )
