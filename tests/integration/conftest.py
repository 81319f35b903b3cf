"""Set-up shared by the runner's integration tests: a runner config for real models from a registry, and an MQTT
subscriber on the test broker."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported where used: the tests that need neither do not load them
    import paho.mqtt.client as mqtt

    from inspection.runner import RunnerConfig


@pytest.fixture
def registry_runner_config(tmp_path: Path) -> Callable[..., RunnerConfig]:
    """`registry_runner_config(registry, token, **kw)`: a runner config serving the models of `registry` with its
    store under the test's tmp_path and bearer `token`, one thread and one warm-up run per model (the tests share
    a small box); `kw` sets the rest."""

    def make(registry: Path, token: str, **kw: Any) -> RunnerConfig:
        from inspection.runner import RunnerConfig
        from inspection.runner.config import AuthConfig

        store = str(tmp_path / "store")
        return RunnerConfig(
            registry=registry, store=store, threads=1, warmup_runs=1, auth=AuthConfig(token=token), **kw
        )

    return make


@pytest.fixture
def mqtt_subscriber(mosquitto_broker: tuple[str, int]) -> Iterator[Callable[[str, str], queue.Queue]]:
    """`mqtt_subscriber(topic, client_id)`: a client subscribed (QoS 1) to `topic` on the test broker, returned once
    the broker confirmed it: the queue its messages (paho's) arrive on. Stopped after the test."""
    host, port = mosquitto_broker
    clients: list[mqtt.Client] = []

    def subscribe(topic: str, client_id: str) -> queue.Queue:
        import paho.mqtt.client as mqtt

        received: queue.Queue = queue.Queue()
        subscribed: queue.Queue = queue.Queue()
        sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        sub.on_message = lambda c, u, msg: received.put(msg)
        sub.on_subscribe = lambda c, u, mid, rc, props: subscribed.put(rc)
        sub.connect(host, port)
        clients.append(sub)
        sub.loop_start()
        sub.subscribe(topic, qos=1)
        subscribed.get(timeout=10)
        return received

    yield subscribe
    for sub in clients:
        sub.loop_stop()
        sub.disconnect()
