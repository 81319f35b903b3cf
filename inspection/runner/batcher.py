"""Micro-batching: frames that arrive together go through the model as one call (the throughput lever).

`workers` threads make the model calls (the runner uses several: one batch's answers go back while others run;
a batch that overlaps another is marked `busy`, so a CPU model runs it on its one-thread session). `submit`
returns a `concurrent.futures.Future` (await it from asyncio with `asyncio.wrap_future`). A worker takes whatever
is queued, up to `max_batch_size`; it waits up to `max_wait_ms` for more only while other requests are still being
read/decoded (the `Incoming` counter the service shares), so a single sequential client never pays the wait,
and under load batches fill by themselves while the model is busy. The model is looked up once per batch: a hot
swap takes effect between batches, never inside one.

`finish` (optional) runs in the worker right after the model call, on the frames submitted with a `context`:
the runner decides and stores the whole batch there in one transaction (one commit per batch, no extra thread
hop per part), and those futures resolve to what `finish` returns for them instead of the bare Prediction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inspection.errors import InspectionError
from inspection.runner.inferencer import Inferencer, Prediction
from inspection.runner.metrics import RunnerMetrics

logger = logging.getLogger(__name__)


class NoModelError(InspectionError):
    """No verified model is loaded (yet): the part cannot get a model verdict."""


class OverloadedError(InspectionError):
    """The queue is full: answering late is worse than holding the part now."""


@dataclass
class _Item:
    image: np.ndarray
    context: Any = None  # handed to `finish` with this frame's Prediction
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


class Incoming:
    """How many requests are being read/decoded right now. One counter can be shared by several batchers (one per
    product): a request's product is known only once its fields are read, and any of them may be about to come."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    @contextmanager
    def track(self):
        with self._lock:
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


class MicroBatcher:
    def __init__(
        self,
        get_model: Callable[[], Inferencer | None],
        max_batch_size: int = 16,
        max_wait_ms: float = 2.0,
        queue_limit: int = 256,
        metrics: RunnerMetrics | None = None,
        workers: int = 1,
        finish: Callable[[list[np.ndarray], list[Prediction], list[Any]], list[Any]] | None = None,
        incoming: Incoming | None = None,
        name: str = "micro-batcher",
    ):
        if workers < 1:
            raise ValueError(f"workers: got {workers}, need at least 1")
        self._get_model = get_model
        self.finish = finish  # may be set after construction, before start()
        self.workers = workers
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_limit = queue_limit
        self.metrics = metrics
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._incoming = incoming or Incoming()
        self.name = name  # thread names: which product's worker a stack trace is from
        self._count_lock = threading.Lock()  # several workers count batches
        self._active = 0  # batches inside the model right now
        self._threads: list[threading.Thread] = []
        self._running = False
        self.batches = 0
        self.frames = 0

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._running = True
        self._threads = [
            threading.Thread(target=self._run, name=f"{self.name}-{i}", daemon=True) for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._running = False
        for _ in self._threads:
            self._queue.put(None)  # one stop signal per worker
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        # whoever still waits gets an answer (held), not a hang
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and not item.future.done():
                item.future.set_exception(NoModelError("the runner is shutting down"))

    # -- producers -----------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, image: np.ndarray, context: Any = None) -> Future:
        """Queue one uint8 RGB frame; the future resolves to a Prediction (with a `context` and a `finish` hook:
        to what `finish` returns for it) or raises (never hangs)."""
        if not self._running:
            raise NoModelError("the micro-batcher is not running")
        if self._queue.qsize() >= self.queue_limit:
            raise OverloadedError(f"{self._queue.qsize()} frames are already queued (limit {self.queue_limit})")
        item = _Item(image, context)
        self._queue.put(item)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        return item.future

    # -- worker --------------------------------------------------------------------------------------------

    def _collect(self, first: _Item) -> list[_Item]:
        batch = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if self._incoming.count <= 0 or remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:  # stop signal: finish this batch, then exit
                self._running = False
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while self._running:
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if first is None:
                break
            batch = self._collect(first)
            # a caller that timed out cancelled its future: do not spend the model on it
            live = [it for it in batch if it.future.set_running_or_notify_cancel()]
            if self.metrics is not None:
                self.metrics.queue_depth.set(self._queue.qsize())
            if live:
                self._infer(live)

    def _infer(self, batch: list[_Item]) -> None:
        model = self._get_model()  # once per batch: swaps land between batches
        if model is None:
            for it in batch:
                it.future.set_exception(NoModelError("no verified model is loaded"))
            return
        with self._count_lock:
            # another batch is in the model, or one is waiting and a free worker will start it now: share the cores
            busy = self._active > 0 or (self.workers > 1 and not self._queue.empty())
            self._active += 1
        try:
            preds: list[Prediction] = model.predict([it.image for it in batch], busy=busy)
        except Exception as exc:  # any failure of the model call holds these parts; the worker keeps going
            logger.exception("inference failed for a batch of %d on model %s", len(batch), model.version)
            for it in batch:
                it.future.set_exception(exc)
            return
        finally:
            with self._count_lock:
                self._active -= 1
        with self._count_lock:
            self.batches += 1
            self.frames += len(batch)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        outcomes: list[Any] = list(preds)
        finished = [i for i, it in enumerate(batch) if it.context is not None] if self.finish is not None else []
        if finished:
            try:
                images = [batch[i].image for i in finished]
                done = self.finish(images, [preds[i] for i in finished], [batch[i].context for i in finished])
                for i, outcome in zip(finished, done, strict=True):
                    outcomes[i] = outcome
            except Exception as exc:  # the hook failed: these parts get the error (held by the caller), others go on
                logger.exception("finishing a batch of %d failed", len(finished))
                for i in finished:
                    batch[i].future.set_exception(exc)
                finished_set = set(finished)
                batch = [it for i, it in enumerate(batch) if i not in finished_set]
                outcomes = [o for i, o in enumerate(outcomes) if i not in finished_set]
        for it, outcome in zip(batch, outcomes, strict=True):
            it.future.set_result(outcome)
