"""Prometheus metrics of one runner instance (own registry, so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Line budgets are tens of milliseconds: resolve that range finely, keep a tail for overload.
LATENCY_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1, 5)


class RunnerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram(
            "inspection_runner_latency_seconds",
            "Request received to answer ready, per inspected part",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "inspection_runner_verdicts_total", "Decisions given, by verdict", ["verdict", "source"], registry=r
        )
        self.errors = Counter(
            "inspection_runner_errors_total",
            "Requests held without a model verdict or failed side effects, by kind",
            ["kind"],
            registry=r,
        )
        self.queue_depth = Gauge("inspection_runner_queue_depth", "Frames waiting for the model", registry=r)
        self.batch_size = Histogram(
            "inspection_runner_batch_size",
            "Frames per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.model_info = Info(
            "inspection_runner_model", "Model version serving and its provider, per product", ["product"], registry=r
        )
        self.model_loaded = Gauge(
            "inspection_runner_model_loaded", "1 when a verified, warm model serves", ["product"], registry=r
        )
        self.swaps = Counter(
            "inspection_runner_model_swaps_total", "Model swap attempts, by outcome", ["outcome"], registry=r
        )
        # per product (new series, so the totals above keep their labels for existing dashboards)
        self.product_swaps = Counter(
            "inspection_runner_product_swaps_total", "Model swaps per product", ["product", "outcome"], registry=r
        )
        self.product_verdicts = Counter(
            "inspection_runner_product_verdicts_total", "Decisions per product", ["product", "verdict"], registry=r
        )
        self.mqtt_published = Counter(
            "inspection_runner_mqtt_published_total", "Verdicts handed to the MQTT client", registry=r
        )

    def set_model(self, version: str, provider: str, alias: str, product: str = "default") -> None:
        self.model_info.labels(product).info({"version": version, "provider": provider, "alias": alias})
        self.model_loaded.labels(product).set(1)

    def swap_outcome(self, product: str, outcome: str) -> None:
        self.swaps.labels(outcome).inc()
        self.product_swaps.labels(product, outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
