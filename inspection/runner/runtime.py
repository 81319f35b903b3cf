"""The runner's runtime: the products it serves (one model slot each), the decision path shared by HTTP, OPC UA
and folder mode, and the decision store's health.

Rules the code keeps, in order of importance:
1. Fail closed: a part never gets `pass` without a model verdict. Bad input -> 4xx with the reason code AND a
   stored `review` decision (the part is held); model error, no model, overload or timeout -> 503 AND a stored
   `review` decision. A product the runner does not serve is bad input like any other.
2. Every decision is in the decision store before its answer is sent (if the store write fails, the answer is
   503 + `review`, since an unlogged verdict must not move a part). Model verdicts are decided and stored by the
   batcher's worker right after the model call, a whole micro-batch per transaction (`Runtime.finish_batch`);
   held parts are stored by the request handler. A `Pending` part is claimed by exactly one of the two.
3. The model is swapped only between micro-batches (see hotswap.py / batcher.py), per product (products.py).
4. Faults degrade, never pass a part: a decision that cannot be stored with its image (disk full) is stored as a
   `review` hold without it (503, reason `store_degraded`); a store write waits for another writer (the review
   app) at most until the part's answer is due; SIGTERM drains (new parts 503 + stored `review`, in-flight ones
   answered) before the process exits; /readyz says `degraded` (with the reasons) while the registry cannot be
   read, an alias points at a refused version, or the store fails writes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from inspection.decisions import KEEP_VERDICTS, DecisionStore, store_busy, store_full
from inspection.errors import ConfigError
from inspection.runner.batcher import Incoming, MicroBatcher
from inspection.runner.config import TOKEN_ENV, RunnerConfig
from inspection.runner.hotswap import HotSwapper, ModelHolder
from inspection.runner.inferencer import Prediction
from inspection.runner.metrics import RunnerMetrics
from inspection.runner.products import ProductSlot, build_slot, resolve_product
from inspection.schemas import InspectionResult, Verdict
from inspection.thresholds import verdict_for

logger = logging.getLogger(__name__)

MIN_WRITE_S = 0.25  # a store write due after its part's timeout still gets this long to wait for the lock
# after a store write failed (not for a lock), every part is held (no verdict is given) until the store's filesystem
# has this much free again: a pass must not slip through in a small row while the flagged parts' images fail
STORE_MIN_FREE_BYTES = 4 << 20
FLAGGED = KEEP_VERDICTS  # review / reject: the parts a defect type is answered for


class StoreShortOfSpace(OSError):
    """Parts held without trying the store: it failed for space and its filesystem has not recovered yet."""


@dataclass(frozen=True)
class Pending:
    """An HTTP part handed to the batcher with its frame: the worker decides and stores it right after the model.

    Exactly one side owns the decision: the worker (stores the model verdict) or the request timing out (stores
    `review`). Whoever `claim`s first; the other leaves it alone, so a part never has two decisions.
    """

    request_id: str
    part_id: str
    station: str
    t0: float
    data: bytes
    sha256: str
    source: str = "http"  # decision store / metrics label: "http" or "opcua"
    product: str | None = None  # the product slot it was submitted to
    _owner: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def claim(self) -> bool:
        return self._owner.acquire(blocking=False)


@dataclass(frozen=True)
class Decided:
    """What the batcher hands back for a Pending part: the verdict and whether it is durably stored."""

    pred: Prediction
    result: InspectionResult  # the stored decision: a `review` hold when `held` (store_degraded)
    stored: bool
    held: bool = False  # the verdict could not be stored with its image; a `review` hold without it was


@dataclass
class Runtime:
    """Everything one runner instance holds; started/stopped by the app lifespan (or by folder-only mode)."""

    config: RunnerConfig
    store: DecisionStore
    metrics: RunnerMetrics
    slots: dict[str, ProductSlot]  # product -> its model, batcher, hot swap and drift monitor (products.py)
    incoming: Incoming = field(default_factory=Incoming)  # requests being read, shared by every product's batcher
    publisher: Any = None  # MqttPublisher when a broker is configured
    folder: Any = None  # FolderWatcher when a drop folder is configured
    opcua: Any = None  # OpcUaServer when opcua.endpoint is set
    draining: threading.Event = field(default_factory=threading.Event)  # SIGTERM: hold new parts, then exit
    draining_since: float = float("inf")  # perf_counter of the signal: requests that came before it are answered
    store_error: str | None = None  # the last store write failed (cleared by the next one that works)
    store_error_since: datetime | None = None
    # a write failed, and not for a busy lock (disk full; SQLite may also say "disk I/O error" on a full disk):
    # every part is held until the store's filesystem has STORE_MIN_FREE_BYTES free
    hold_until_space: bool = False

    @classmethod
    def build(cls, config: RunnerConfig) -> Runtime:
        if config.auth.required and not config.resolved_token():
            raise ConfigError(
                f"auth.required is true but no token is set: export {TOKEN_ENV}=... or set auth.token "
                "(or auth.required: false on an isolated network)"
            )
        for mode, stations in (
            ("folder mode", (config.station,) if config.folder.watch else ()),
            ("OPC UA", config.opcua_stations if config.opcua.endpoint else ()),
        ):
            unset = [s for s in stations if config.product_for_station(s) is None]
            if unset:
                raise ConfigError(f"{mode}: stations {unset} have no product (set station_products or product)")
        metrics = RunnerMetrics()
        store = DecisionStore(config.store, config.media_dir)
        incoming = Incoming()
        slots = {p: build_slot(config, p, metrics, incoming) for p in config.served_products}
        publisher = None
        if config.mqtt.host:
            from inspection.runner.mqtt import MqttPublisher

            publisher = MqttPublisher(config.mqtt, config.station, store, metrics)
        rt = cls(config, store, metrics, slots, incoming, publisher)
        for slot in slots.values():
            slot.batcher.finish = rt.finish_batch  # decide and store each batch in the worker, one transaction
        if config.folder.watch is not None:
            from inspection.runner.folder import FolderWatcher

            rt.folder = FolderWatcher(rt)
        if config.opcua.endpoint:
            from inspection.runner.opcua import OpcUaServer

            rt.opcua = OpcUaServer(rt)  # checks users and certificates now: a bad setup stops the start
        return rt

    # -- the products served (products.py); the single-product names below are the default product's slot ---

    @property
    def default_product(self) -> str:
        """The product of requests that name none (config.product), else the first served."""
        return self.config.product if self.config.product in self.slots else next(iter(self.slots))

    @property
    def slot(self) -> ProductSlot:
        return self.slots[self.default_product]

    @property
    def holder(self) -> ModelHolder:
        return self.slot.holder

    @property
    def batcher(self) -> MicroBatcher:
        return self.slot.batcher

    @property
    def swapper(self) -> HotSwapper | None:
        return self.slot.swapper

    @swapper.setter
    def swapper(self, value: HotSwapper | None) -> None:
        self.slot.swapper = value

    def resolve(self, requested: str | None, station: str) -> ProductSlot:
        """The slot for a part naming `requested` from `station` (ProductError: held, see products.py)."""
        return resolve_product(self.config, self.slots, requested, station)

    def slot_for_station(self, station: str) -> ProductSlot:
        """The slot of a station's parts (OPC UA, folder mode): its fixed product, else the runner's."""
        return self.resolve(None, station)

    def start(self) -> None:
        for slot in self.slots.values():
            slot.start(self.config.swap.enabled)
        if self.publisher is not None:
            self.publisher.start()
        if self.folder is not None:
            self.folder.start()
        if self.opcua is not None:
            self.opcua.start()

    def stop(self) -> None:
        if self.opcua is not None:
            self.opcua.stop()
        if self.folder is not None:
            self.folder.stop()
        for slot in self.slots.values():
            slot.stop_swapper()
        for slot in self.slots.values():
            slot.batcher.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.store.close()

    def wait_ready(self, timeout: float) -> bool:
        """True once every product served has a verified model (within `timeout` seconds in all)."""
        deadline = time.monotonic() + timeout
        return all(s.holder.ready.wait(max(0.0, deadline - time.monotonic())) for s in self.slots.values())

    # -- the decision path shared by HTTP and folder mode --------------------------------------------------

    def decide(
        self,
        request_id: str,
        part_id: str,
        station: str,
        t0: float,
        pred: Prediction | None,
        reason: str | None,
        image_sha256: str | None,
        product: str | None = None,
    ) -> InspectionResult:
        """The decision for one part: the model's verdict, or a `review` hold (no `pred`) with its `reason`.
        `product`: the product it was judged as, or for a held part the one it names or would have had (a
        product not served is recorded as named; None: not known). A flagged part of a typed model carries its
        most likely defect type."""
        defect_type = type_probability = None
        if pred is not None:
            verdict = verdict_for(pred.score, pred.thresholds)
            score, thresholds, version = pred.score, pred.thresholds, pred.version
            if verdict in FLAGGED:  # QA is told what to look for; a passed part has no defect to name
                defect_type, type_probability = pred.defect_type, pred.defect_type_probability
        else:
            verdict, score, thresholds, version = Verdict.review, None, None, None  # held: no model verdict
        slot = self.slots.get(product) if product is not None else self.slot
        current = slot.holder.current if slot is not None else None
        if pred is None and current is not None:
            version = current.version  # which model would have judged it: useful when reviewing
        return InspectionResult(
            request_id=request_id,
            part_id=part_id,
            station=station,
            timestamp=datetime.now(UTC),
            verdict=verdict,
            defect_score=score,
            thresholds=thresholds,
            model_version=version,
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            reason=reason,
            image_sha256=image_sha256,
            product=product,
            defect_type=defect_type,
            defect_type_probability=type_probability,
        )

    def finish_batch(
        self, images: list[np.ndarray], preds: list[Prediction], pending: list[Pending]
    ) -> list[Decided | None]:
        """In the batcher's worker, right after the model: decide each part, store the batch in one
        transaction, then metrics, MQTT and drift. A part whose request already timed out (and was held) is
        skipped (None). A failed store write leaves every part of the batch unstored: each answers 503 + review."""
        owned = [i for i, p in enumerate(pending) if p.claim()]
        results = {
            i: self.decide(
                pending[i].request_id,
                pending[i].part_id,
                pending[i].station,
                pending[i].t0,
                preds[i],
                None,
                pending[i].sha256,
                pending[i].product,
            )
            for i in owned
        }
        stored, held = True, False
        budget = self.write_budget(min((pending[i].t0 for i in owned), default=time.perf_counter()))
        try:
            if owned and self.hold_until_space and not self._space_back():
                why = f"the decision store is still short of space ({self.store_error})"
                raise StoreShortOfSpace(errno.ENOSPC, why)
            self.store.record_many(
                [(results[i], pending[i].data, preds[i].heatmap, pending[i].source) for i in owned], timeout_s=budget
            )
        except Exception as exc:
            self.store_failed(exc, len(owned))
            stored = False
            if owned and not store_busy(exc):  # e.g. disk full: the images do not fit, a hold row may
                holds = {i: self._degraded_hold(results[i], exc) for i in owned}
                try:
                    self.store.record_many(
                        [(holds[i], None, None, pending[i].source) for i in owned],
                        timeout_s=self.write_budget(min(pending[i].t0 for i in owned)),
                    )
                except Exception as exc2:
                    self.store_failed(exc2, 0)
                else:
                    results, stored, held = holds, True, True
                    self.metrics.errors.labels("store_degraded").inc(len(owned))
        if stored and not held:
            self.store_ok()
        out: list[Decided | None] = [None] * len(pending)
        for i in owned:
            out[i] = Decided(preds[i], results[i], stored, held)
            if not stored:
                continue
            try:  # the decision is stored: telemetry trouble must not turn it into an error
                self.after_record(results[i], pending[i].source)
                self.observe_drift(
                    images[i], preds[i].score, results[i].verdict.value, preds[i].version, pending[i].product
                )
            except Exception:
                logger.exception("metrics/MQTT/drift failed after storing %s", results[i].request_id)
        return out

    # -- store health ---------------------------------------------------------------------------------------

    def write_budget(self, t0: float) -> float:
        """How long a store write for a part received at `t0` may wait for another writer: until its answer is
        due (batching.timeout_s), and at least MIN_WRITE_S."""
        return max(MIN_WRITE_S, t0 + self.config.batching.timeout_s - time.perf_counter())

    def store_failed(self, exc: BaseException, parts: int) -> None:
        if self.store_error is None:
            self.store_error_since = datetime.now(UTC)
        if not store_busy(exc):
            self.hold_until_space = True
            if not store_full(exc):
                logger.warning("store failure not recognised as a full disk; holding parts until space is checked")
        if not isinstance(exc, StoreShortOfSpace):  # keep the first cause
            self.store_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        if parts:
            logger.error("decision store write failed (%d parts held as review): %s", parts, self.store_error)
            self.metrics.errors.labels("store").inc(parts)

    def store_ok(self) -> None:
        if self.store_error is not None and not self.hold_until_space:  # a small row fitting: not space back
            logger.warning("decision store writes work again (failing since %s)", self.store_error_since)
            self.store_error = self.store_error_since = None

    def _space_back(self) -> bool:
        """While the store is short of space: has its filesystem STORE_MIN_FREE_BYTES free again?"""
        try:
            free = shutil.disk_usage(self.store.media_dir).free
        except OSError:
            return False
        if free >= STORE_MIN_FREE_BYTES:
            logger.warning("decision store has %.1f MiB free again: giving verdicts again", free / 2**20)
            self.hold_until_space = False
        return not self.hold_until_space

    def _degraded_hold(self, result: InspectionResult, exc: BaseException) -> InspectionResult:
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        return result.model_copy(
            update={
                "verdict": Verdict.review,
                "reason": f"store_degraded: the {result.verdict.value} verdict could not be stored with its image "
                f"({why}); the part is held without it",
            }
        )

    def store_hold(self, result: InspectionResult, data: bytes | None, source: str, t0: float) -> None:
        """Store a held `review` decision with the bytes that came (QA sees them); when that fails for any
        reason but a busy store (disk full: the image does not fit), store it without them. Raises when
        neither could be stored."""
        try:
            self.store.record_inspection(result, data, None, source, timeout_s=self.write_budget(t0))
        except Exception as exc:
            self.store_failed(exc, 0)  # as for a batch: a full disk holds every part until space is back
            if not data or store_busy(exc):
                raise
            logger.warning("held %s: storing it without its image (%s)", result.request_id, exc)
            try:
                self.store.record_inspection(result, None, None, source, timeout_s=self.write_budget(t0))
            except Exception as exc2:
                self.store_failed(exc2, 0)
                raise
        else:
            self.store_ok()

    async def hold_part(
        self,
        source: str,
        reason: str,
        message: str,
        request_id: str,
        part_id: str,
        station: str,
        t0: float,
        data: bytes,
        product: str | None,
        to_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> tuple[InspectionResult, bool]:
        """Decide and store a `review` hold (no model verdict) for a part that came by `source`, counted under its
        reason code, with the bytes that came unless they are over the image limit (QA sees what the camera gave).
        `to_thread` runs the store write off the event loop. Returns the decision and whether it is stored: a
        stored one is counted and published (`after_record`), a failed write is logged and counted."""
        sha = hashlib.sha256(data).hexdigest() if data else None
        result = self.decide(request_id, part_id, station, t0, None, f"{reason}: {message}", sha, product)
        self.metrics.errors.labels(reason).inc()
        keep = data if data and len(data) <= self.config.image_limits.max_bytes else None
        try:
            await to_thread(self.store_hold, result, keep, source, t0)  # without the image if it cannot fit
        except Exception:
            logger.exception("decision store write failed for held request %s", request_id)
            self.metrics.errors.labels("store").inc()
            return result, False
        self.after_record(result, source)
        return result, True

    def begin_drain(self) -> None:
        """Stop taking parts (each new one is held: 503 + stored `review`; /readyz 503); in-flight ones finish."""
        if not self.draining.is_set():
            logger.warning("shutting down: new parts are held (503 + review) while in-flight parts finish")
            self.draining_since = time.perf_counter()
        self.draining.set()

    def degraded_reasons(self) -> list[str]:
        """Why this runner serves, but not as it should (/readyz `degraded`)."""
        reasons = []
        several = len(self.slots) > 1
        for product, slot in self.slots.items():
            if slot.swapper is not None:
                reasons += [f"product {product}: {r}" if several else r for r in slot.swapper.degraded_reasons()]
        if self.store_error is not None:
            since = f"{self.store_error_since:%H:%M:%S}" if self.store_error_since else "?"
            reasons.append(f"decision store writes failing since {since} UTC: {self.store_error}")
        if self.hold_until_space:
            reasons.append(
                f"decision store short of space: every part is held (review) until {STORE_MIN_FREE_BYTES >> 20} MiB "
                "are free"
            )
        return reasons

    def observe_drift(self, image: Any, score: float, verdict: str, version: str, product: str | None = None) -> None:
        """Feed the product's drift monitor (well under 1 ms); its reference belongs to the model that scored."""
        if not self.config.drift_enabled:
            return
        slot = self.slots.get(product or self.default_product)
        if slot is not None:
            slot.observe_drift(image, score, verdict, version, self.config.drift)

    def after_record(self, result: InspectionResult, source: str) -> None:
        """Metrics and MQTT once a decision is durably stored."""
        self.metrics.latency.labels(source).observe(result.latency_ms / 1000.0)
        self.metrics.verdicts.labels(result.verdict.value, source).inc()
        if result.product in self.slots:  # not a product nobody serves: a client must not create series
            self.metrics.product_verdicts.labels(result.product, result.verdict.value).inc()
        if self.publisher is not None:
            self.publisher.notify(result)  # the verdict is in the store's outbox: wake the MQTT relay
