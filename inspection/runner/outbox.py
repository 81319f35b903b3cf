"""The MQTT outbox: verdicts wait in the decision store until the broker has acknowledged them.

Every decision is written together with its outbox row (one transaction, `DecisionStore.enable_outbox`), so a
verdict exists for the relay as soon as it exists at all: a broker outage, a crash or a restart of the runner in
between loses nothing. `Outbox` is the relay's view of those rows (oldest first) plus the metrics that show the
backlog on `/metrics`; the relay itself (publish, wait for PUBACK, delete) is `MqttPublisher` in mqtt.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from inspection.decisions import DecisionStore
from inspection.runner.metrics import RunnerMetrics
from inspection.schemas import InspectionResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboxMessage:
    id: int  # outbox row id: the order verdicts were stored in
    request_id: str  # in the payload too: consumers drop duplicates (QoS 1 is at least once)
    topic: str
    payload: str


class Outbox:
    """The outbox rows of one producer (this runner) in one decision store."""

    def __init__(
        self,
        store: DecisionStore,
        producer: str,
        topic_for: Callable[[InspectionResult], str],
        max_rows: int,
        metrics: RunnerMetrics | None = None,
    ):
        self.store = store
        self.producer = producer
        self.max_rows = max_rows
        store.enable_outbox(producer, topic_for)
        self.backlog = self.delivered_total = self.dropped_total = None
        if metrics is not None:
            r = metrics.registry
            self.backlog = Gauge(
                "inspection_runner_mqtt_outbox_backlog",
                "Verdicts stored but not yet acknowledged by the broker",
                registry=r,
            )
            self.delivered_total = Counter(
                "inspection_runner_mqtt_delivered_total", "Verdicts acknowledged by the broker (PUBACK)", registry=r
            )
            self.dropped_total = Counter(
                "inspection_runner_mqtt_outbox_dropped_total",
                "Oldest verdicts dropped from a full outbox (mqtt.outbox_max_rows); still in the decision store",
                registry=r,
            )

    def pending(self, limit: int) -> list[OutboxMessage]:
        rows = self.store.outbox_pending(self.producer, limit)
        return [OutboxMessage(int(r["id"]), r["request_id"], r["topic"], r["payload"]) for r in rows]

    def delivered(self, messages: list[OutboxMessage]) -> None:
        self.store.outbox_delivered([m.id for m in messages])
        if self.delivered_total is not None and messages:
            self.delivered_total.inc(len(messages))

    def refresh(self) -> int:
        """Trim a full outbox, update the backlog gauge; returns the backlog."""
        n = self.store.outbox_count(self.producer)
        if n > self.max_rows:
            dropped = self.store.outbox_trim(self.producer, self.max_rows)
            logger.error(
                "MQTT outbox full (%d rows, limit %d): dropped the %d oldest verdicts unpublished; they stay in the "
                "decision store (GET /v1/results/{request_id})",
                n,
                self.max_rows,
                dropped,
            )
            if self.dropped_total is not None:
                self.dropped_total.inc(dropped)
            n -= dropped
        if self.backlog is not None:
            self.backlog.set(n)
        return n
