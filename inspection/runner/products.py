"""One model slot per product: a runner serves several products (part types) side by side.

Each slot has what serving one model needs, and nothing is shared between slots but the decision store and the
HTTP/OPC UA front: its own `ModelHolder`, its own `MicroBatcher` (own queue and workers, so one product's burst
or slow model never queues another's parts), its own `HotSwapper` following that product's aliases in the
registry, and its own drift monitor. A swap, a refused version or a rollback of one product touches only its
slot: the others keep serving.

Which slot a part goes to (`resolve_product`): the product the request names (HTTP `product` query or form field,
or `X-Product`); else the product fixed for its station (`station_products`, also what OPC UA stations and folder
mode use); else the runner's `product`. A product that is not served, or that contradicts the station's fixed one,
is a held part (4xx + a stored `review`), never a guess.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from inspection.errors import InspectionError, RegistryError
from inspection.registry import check_product
from inspection.runner.batcher import Incoming, MicroBatcher
from inspection.runner.config import RunnerConfig
from inspection.runner.hotswap import HotSwapper, ModelHolder
from inspection.runner.inferencer import load_inferencer
from inspection.runner.metrics import RunnerMetrics

logger = logging.getLogger(__name__)


class ProductError(InspectionError):
    """A part's product cannot be served: `reason` is the code stored with its `review` hold."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class ProductSlot:
    """The serving state of one product (see the module docstring)."""

    product: str
    holder: ModelHolder
    batcher: MicroBatcher
    swapper: HotSwapper | None = None
    drift: Any = None  # DriftMonitor of the serving version (rebuilt when a swap changes the version)
    drift_version: str | None = None

    def start(self, follow_alias: bool) -> None:
        self.batcher.start()
        if self.swapper is not None:
            # first load happens in a background thread: /healthz answers at once, /readyz once the model is warm
            if follow_alias:
                self.swapper.start(initial=False)
            else:
                threading.Thread(target=self.swapper.check, name=f"model-load-{self.product}", daemon=True).start()

    def stop_swapper(self) -> None:
        if self.swapper is not None:
            self.swapper.stop()

    def observe_drift(self, image: Any, score: float, verdict: str, version: str, config: Any) -> None:
        """Feed this product's drift monitor; its reference belongs to the model version that scored."""
        if version != self.drift_version:
            from inspection.drift import DriftMonitor

            current = self.holder.current
            model_dir = getattr(current, "model_path", None)
            if current is None or current.version != version or model_dir is None:
                return  # a swap is under way: the next part starts the new version's monitor
            self.drift = DriftMonitor.for_model_dir(Path(model_dir).parent, config)
            self.drift_version = version
        self.drift.observe(image, score, verdict)

    def status(self) -> dict[str, Any]:
        """What /readyz says about this product."""
        current = self.holder.current
        body: dict[str, Any] = {
            "ready": current is not None,
            "model_version": current.version if current else None,
            "provider": current.provider if current else None,
            "defect_types": list(current.type_names) if current else [],
            "queue_depth": self.batcher.depth,
        }
        if self.swapper is not None:
            if current is None:
                body["error"] = self.swapper.last_error
            body["degraded_reasons"] = self.swapper.degraded_reasons()
        return body


def build_slot(
    config: RunnerConfig, product: str, metrics: RunnerMetrics, incoming: Incoming | None = None
) -> ProductSlot:
    """A slot for `product`: its batcher (not started) and, with a registry, its hot swapper (not started)."""
    holder = ModelHolder()
    batcher = MicroBatcher(
        lambda: holder.current,
        max_batch_size=config.batching.max_batch_size,
        max_wait_ms=config.batching.max_wait_ms,
        queue_limit=config.batching.queue_limit,
        metrics=metrics,
        workers=config.batching.workers,
        incoming=incoming,
        name=f"micro-batcher-{product}" if len(config.served_products) > 1 else "micro-batcher",
    )
    swapper = None
    if config.registry is not None:
        loader = partial(
            load_inferencer,
            config.registry,
            providers=config.providers,
            threads=config.threads,
            spinning=config.spinning,
            busy_threads=config.busy_threads,
            model_file=config.model_file,
            smoke_runs=config.swap.smoke_runs,
            warmup_runs=config.warmup_runs,
            peak_batch=config.batching.max_batch_size if config.warmup_runs else 0,
            peak_concurrency=config.batching.workers,
            product=product,
        )
        swapper = HotSwapper(config.registry, holder, config.alias, config.swap.poll_s, metrics, loader, product)
    return ProductSlot(product, holder, batcher, swapper)


def resolve_product(
    config: RunnerConfig, served: dict[str, ProductSlot], requested: str | None, station: str
) -> ProductSlot:
    """The slot of a part that names `requested` (or None) and comes from `station`; ProductError if none fits."""
    fixed = config.station_products.get(station)
    if requested is not None:
        try:
            check_product(requested)
        except RegistryError as exc:
            raise ProductError("bad_field", str(exc)) from None
        if fixed is not None and requested != fixed:
            why = f"station {station} inspects product {fixed!r} only; the request names {requested!r}"
            raise ProductError("product_mismatch", why)
    product = requested or fixed or config.product
    if product is None:
        raise ProductError(
            "missing_product",
            f"this runner serves several products ({', '.join(served)}) and no default: name one (query or form "
            "field product, or X-Product)",
        )
    slot = served.get(product)
    if slot is None:
        raise ProductError(
            "unknown_product", f"product {product!r} is not served by this runner; served: {', '.join(served)}"
        )
    return slot
