"""The runner's HTTP service (FastAPI) and the runtime behind it (model, batcher, store, MQTT, folder watcher).

Rules the code keeps, in order of importance:
1. Fail closed: a part never gets `pass` without a model verdict. Bad input -> 4xx with the reason code AND a
   stored `review` decision (the part is held); model error, no model, overload or timeout -> 503 AND a stored
   `review` decision.
2. Every decision is in the decision store before its answer is sent (if the store write fails, the answer is
   503 + `review`, since an unlogged verdict must not move a part). Model verdicts are decided and stored by the
   batcher's worker right after the model call, a whole micro-batch per transaction (`Runtime.finish_batch`);
   held parts are stored by the request handler. A `Pending` part is claimed by exactly one of the two.
3. The model is swapped only between micro-batches (see hotswap.py / batcher.py).
4. Faults degrade, never pass a part: a decision that cannot be stored with its image (disk full) is stored as a
   `review` hold without it (503, reason `store_degraded`); a store write waits for another writer (the review
   app) at most until the part's answer is due; SIGTERM drains (new parts 503 + stored `review`, in-flight ones
   answered) before the process exits; /readyz says `degraded` (with the reasons) while the registry cannot be
   read, the alias points at a refused version, or the store fails writes.

Authentication: unauthenticated requests are refused before anything is stored (they must not be able to fill
the store); the bearer token comes from INSPECTION_RUNNER_TOKEN or the config.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import re
import shutil
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from inspection import __version__
from inspection.decisions import DecisionStore, store_busy, store_full
from inspection.errors import ConfigError, ImageValidationError
from inspection.images import decode_image
from inspection.runner.batcher import MicroBatcher, NoModelError, OverloadedError
from inspection.runner.config import TOKEN_ENV, RunnerConfig
from inspection.runner.hotswap import HotSwapper, ModelHolder
from inspection.runner.inferencer import Prediction, load_inferencer
from inspection.runner.metrics import RunnerMetrics
from inspection.schemas import InspectionResult, Verdict
from inspection.thresholds import verdict_for

logger = logging.getLogger(__name__)

# HTTP status per image reason code (images.REASONS) and per request-level problem
STATUS_FOR_REASON = {
    "empty": 400,
    "too_large_file": 413,
    "unsupported_format": 415,
    "unsupported_media_type": 415,
    "missing_file": 400,
    "missing_part_id": 400,
    "bad_field": 400,
    "bad_multipart": 400,
}
MIN_WRITE_S = 0.25  # a store write due after its part's timeout still gets this long to wait for the lock
# after a store write failed (not for a lock), every part is held (no verdict is given) until the store's filesystem
# has this much free again: a pass must not slip through in a small row while the flagged parts' images fail
STORE_MIN_FREE_BYTES = 4 << 20
_ID_RE = re.compile(r"^[\w.\-:/#]{1,256}$")  # part ids and stations as PLCs send them; no spaces/control chars
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")


class InspectError(BaseModel):
    """Body of a 4xx/503 answer to /v1/inspect: why, and the stored `review` decision (the part is held)."""

    detail: str
    reason: str
    result: InspectionResult | None


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


class _Held(Exception):
    """Internal: this request ends with a stored `review` decision and an error status."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class Runtime:
    """Everything one runner instance holds; started/stopped by the app lifespan (or by folder-only mode)."""

    config: RunnerConfig
    store: DecisionStore
    metrics: RunnerMetrics
    holder: ModelHolder
    batcher: MicroBatcher
    swapper: HotSwapper | None
    publisher: Any = None  # MqttPublisher when a broker is configured
    folder: Any = None  # FolderWatcher when a drop folder is configured
    drift: Any = None  # DriftMonitor of the serving version (rebuilt when a swap changes the version)
    drift_version: str | None = None
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
        metrics = RunnerMetrics()
        holder = ModelHolder()
        store = DecisionStore(config.store, config.media_dir)
        batcher = MicroBatcher(
            lambda: holder.current,
            max_batch_size=config.batching.max_batch_size,
            max_wait_ms=config.batching.max_wait_ms,
            queue_limit=config.batching.queue_limit,
            metrics=metrics,
            workers=config.batching.workers,
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
            )
            swapper = HotSwapper(config.registry, holder, config.alias, config.swap.poll_s, metrics, loader)
        publisher = None
        if config.mqtt.host:
            from inspection.runner.mqtt import MqttPublisher

            publisher = MqttPublisher(config.mqtt, config.station, store, metrics)
        rt = cls(config, store, metrics, holder, batcher, swapper, publisher)
        batcher.finish = rt.finish_batch  # decide and store each batch in the worker, one transaction
        if config.folder.watch is not None:
            from inspection.runner.folder import FolderWatcher

            rt.folder = FolderWatcher(rt)
        if config.opcua.endpoint:
            from inspection.runner.opcua import OpcUaServer

            rt.opcua = OpcUaServer(rt)  # checks users and certificates now: a bad setup stops the start
        return rt

    def start(self) -> None:
        self.batcher.start()
        if self.publisher is not None:
            self.publisher.start()
        if self.swapper is not None:
            # first load happens in a background thread: /healthz answers at once, /readyz once the model is warm
            if self.config.swap.enabled:
                self.swapper.start(initial=False)
            else:
                threading.Thread(target=self.swapper.check, name="model-load", daemon=True).start()
        if self.folder is not None:
            self.folder.start()
        if self.opcua is not None:
            self.opcua.start()

    def stop(self) -> None:
        if self.opcua is not None:
            self.opcua.stop()
        if self.folder is not None:
            self.folder.stop()
        if self.swapper is not None:
            self.swapper.stop()
        self.batcher.stop()
        if self.publisher is not None:
            self.publisher.stop()
        self.store.close()

    def wait_ready(self, timeout: float) -> bool:
        return self.holder.ready.wait(timeout)

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
    ) -> InspectionResult:
        if pred is not None:
            verdict = verdict_for(pred.score, pred.thresholds)
            score, thresholds, version = pred.score, pred.thresholds, pred.version
        else:
            verdict, score, thresholds, version = Verdict.review, None, None, None  # held: no model verdict
        current = self.holder.current
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
            )
            for i in owned
        }
        stored, held = True, False
        budget = self.write_budget(min((pending[i].t0 for i in owned), default=time.perf_counter()))
        try:
            if owned and self.hold_until_space and not self._space_back():
                raise OSError(errno.ENOSPC, f"the decision store is still short of space ({self.store_error})")
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
                self.observe_drift(images[i], preds[i].score, results[i].verdict.value, preds[i].version)
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
        if not (isinstance(exc, OSError) and "still short of space" in str(exc)):  # keep the first cause
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
            if not data or store_busy(exc):
                self.store_failed(exc, 0)
                raise
            logger.warning("held %s: storing it without its image (%s)", result.request_id, exc)
            try:
                self.store.record_inspection(result, None, None, source, timeout_s=self.write_budget(t0))
            except Exception as exc2:
                self.store_failed(exc2, 0)
                raise
        else:
            self.store_ok()

    def begin_drain(self) -> None:
        """Stop taking parts (each new one is held: 503 + stored `review`; /readyz 503); in-flight ones finish."""
        if not self.draining.is_set():
            logger.warning("shutting down: new parts are held (503 + review) while in-flight parts finish")
            self.draining_since = time.perf_counter()
        self.draining.set()

    def degraded_reasons(self) -> list[str]:
        """Why this runner serves, but not as it should (/readyz `degraded`)."""
        reasons = []
        if self.swapper is not None:
            reasons += self.swapper.degraded_reasons()
        if self.store_error is not None:
            since = f"{self.store_error_since:%H:%M:%S}" if self.store_error_since else "?"
            reasons.append(f"decision store writes failing since {since} UTC: {self.store_error}")
        if self.hold_until_space:
            reasons.append(
                f"decision store short of space: every part is held (review) until {STORE_MIN_FREE_BYTES >> 20} MiB "
                "are free"
            )
        return reasons

    def observe_drift(self, image: Any, score: float, verdict: str, version: str) -> None:
        """Feed the drift monitor (well under 1 ms); its reference belongs to the model version that scored."""
        if not self.config.drift_enabled:
            return
        if version != self.drift_version:
            from inspection.drift import DriftMonitor

            current = self.holder.current
            model_dir = getattr(current, "model_path", None)
            if current is None or current.version != version or model_dir is None:
                return  # a swap is under way: the next part starts the new version's monitor
            self.drift = DriftMonitor.for_model_dir(Path(model_dir).parent, self.config.drift)
            self.drift_version = version
        self.drift.observe(image, score, verdict)

    def after_record(self, result: InspectionResult, source: str) -> None:
        """Metrics and MQTT once a decision is durably stored."""
        self.metrics.latency.labels(source).observe(result.latency_ms / 1000.0)
        self.metrics.verdicts.labels(result.verdict.value, source).inc()
        if self.publisher is not None:
            self.publisher.notify(result)  # the verdict is in the store's outbox: wake the MQTT relay


def _token_checker(config: RunnerConfig, scope: str):
    def check(request: Request) -> None:
        token = config.resolved_token()
        needed = config.auth.required if scope == "api" else getattr(config.auth, scope)
        if not needed:
            return
        if not token:  # health/metrics protected but no token configured: refuse rather than open
            raise HTTPException(503, "authentication is required but no token is configured")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(403, "wrong bearer token")

    return check


async def _read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) as soon as it exceeds `limit` bytes, before buffering it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _Held(413, "too_large_file", f"Content-Length {declared} exceeds the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Held(413, "too_large_file", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _field(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Held(400, "bad_field", f"{name} must be a text field")
    if not _ID_RE.match(value):
        raise _Held(400, "bad_field", f"{name} {value[:80]!r} must be 1-256 characters of letters, digits, ._-:/#")
    return value


def create_app(config: RunnerConfig, runtime: Runtime | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the runtime (build one yourself to reach its parts)."""
    rt = runtime or Runtime.build(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start()
        try:
            yield
        finally:
            rt.stop()

    app = FastAPI(
        title="inspection runner",
        version=__version__,
        summary="pass / review / reject per cast part, fail-closed; every decision logged",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    api_auth = Depends(_token_checker(config, "api"))
    health_auth = Depends(_token_checker(config, "health"))
    metrics_auth = Depends(_token_checker(config, "metrics"))
    limits = config.image_limits
    timeout = config.batching.timeout_s

    async def held(
        status: int, reason: str, message: str, request_id: str, part_id: str, station: str, t0: float, data: bytes
    ) -> Response:
        sha = hashlib.sha256(data).hexdigest() if data else None
        result = rt.decide(request_id, part_id, station, t0, None, f"{reason}: {message}", sha)
        rt.metrics.errors.labels(reason).inc()
        try:
            # keep what was sent (when it is not absurdly large): QA sees exactly what the camera gave
            keep = data if data and len(data) <= limits.max_bytes else None
            await run_in_threadpool(rt.store_hold, result, keep, "http", t0)
        except Exception:
            logger.exception("decision store write failed for held request %s", request_id)
            rt.metrics.errors.labels("store").inc()
            status = 503
            body = InspectError(
                detail=f"{message}; the hold could not be stored either",
                reason="store_error",
                result=result.model_copy(update={"reason": f"store_error: {result.reason}"}),
            )
            return Response(body.model_dump_json(), status_code=status, media_type="application/json")
        else:
            rt.after_record(result, "http")
        logger.warning("request %s part %s held (%s): %s", request_id, part_id, reason, message)
        body = InspectError(detail=message, reason=reason, result=result)
        # draining: close the connection after this answer, so the client's next part opens a new one, which is
        # held while the port is open and refused cleanly once it closes (never a reset of a sent request)
        headers = {"Connection": "close"} if rt.draining.is_set() else None
        return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)

    @app.post(
        "/v1/inspect",
        response_model=InspectionResult,
        dependencies=[api_auth],
        responses={
            400: {"model": InspectError},
            413: {"model": InspectError},
            415: {"model": InspectError},
            422: {"model": InspectError},
            503: {"model": InspectError},
        },
        summary="Inspect one part: image bytes (raw body image/* or application/octet-stream, or multipart 'file')",
    )
    async def inspect(request: Request, part_id: str | None = None, station: str | None = None) -> Response:
        """`part_id` and `station` come from the query, the multipart form, or the `X-Part-Id` / `X-Station`
        headers; the station defaults to the runner's own."""
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        data = b""
        pid = sid = None
        image: np.ndarray | None = None
        with rt.batcher.incoming():
            try:
                ctype = request.headers.get("content-type", "").lower()
                if ctype.startswith("multipart/form-data"):
                    declared = request.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > limits.max_bytes + 65536:
                        raise _Held(413, "too_large_file", f"Content-Length {declared} exceeds the limit")
                    try:
                        form = await request.form(max_files=1, max_fields=16)
                    except Exception as exc:  # malformed multipart, too many files/fields: still a held part
                        raise _Held(400, "bad_multipart", f"multipart body cannot be parsed: {exc}") from None
                    upload = form.get("file")
                    pid = _field(part_id, "part_id") or _field(form.get("part_id"), "part_id")
                    sid = _field(station, "station") or _field(form.get("station"), "station")
                    if upload is None or isinstance(upload, str):
                        raise _Held(400, "missing_file", "multipart body has no file field named 'file'")
                    data = await upload.read(limits.max_bytes + 1)
                    await form.close()
                else:
                    pid = _field(part_id, "part_id")
                    sid = _field(station, "station")
                    if not ctype.startswith(IMAGE_CONTENT_TYPES):
                        data = await _read_limited(request, limits.max_bytes)  # kept with the held decision
                        raise _Held(
                            415,
                            "unsupported_media_type",
                            f"Content-Type {ctype or '(none)'!r} is not allowed; send image/* or "
                            "application/octet-stream, or multipart/form-data with a 'file' field",
                        )
                    data = await _read_limited(request, limits.max_bytes)
                pid = pid or _field(request.headers.get("x-part-id"), "X-Part-Id")
                sid = sid or _field(request.headers.get("x-station"), "X-Station")
                if pid is None:
                    raise _Held(400, "missing_part_id", "part_id is required (query, form field or X-Part-Id)")
                if rt.draining.is_set() and t0 >= rt.draining_since:  # one that came before the signal is answered
                    raise _Held(503, "shutting_down", "the runner is shutting down; the part is held")
                image = decode_image(data, limits)
                sha = hashlib.sha256(data).hexdigest()
                pending = Pending(request_id, pid, sid or config.station, t0, data, sha)
                future = rt.batcher.submit(image, pending)
            except _Held as exc:
                return await held(
                    exc.status, exc.reason, exc.message, request_id, pid or "unknown", sid or config.station, t0, data
                )
            except ImageValidationError as exc:
                status = STATUS_FOR_REASON.get(exc.reason, 422)
                return await held(
                    status, exc.reason, exc.detail, request_id, pid or "unknown", sid or config.station, t0, data
                )
            except (NoModelError, OverloadedError) as exc:
                reason = "no_model" if isinstance(exc, NoModelError) else "overloaded"
                return await held(503, reason, str(exc), request_id, pid, sid or config.station, t0, data)
        station_id = sid or config.station
        waiting = asyncio.wrap_future(future)
        try:
            try:
                decided: Decided | None = await asyncio.wait_for(asyncio.shield(waiting), timeout)
            except TimeoutError:
                if pending.claim():  # the worker has not taken this part: it is held, the worker will skip it
                    future.cancel()
                    return await held(
                        503, "timeout", f"no model verdict within {timeout} s", request_id, pid, station_id, t0, data
                    )
                decided = await waiting  # the worker owns it and is storing its verdict right now
        except NoModelError as exc:
            return await held(503, "no_model", str(exc), request_id, pid, station_id, t0, data)
        except Exception as exc:  # the model failed on this batch: hold the part
            return await held(
                503, "model_error", f"{type(exc).__name__}: {exc}"[:500], request_id, pid, station_id, t0, data
            )
        if decided is None:  # cannot happen: only a part claimed by a timeout is skipped, and that one returned
            raise RuntimeError(f"request {request_id}: the worker skipped a part nobody held")
        result = decided.result
        if decided.held:  # stored as a `review` hold: the verdict did not fit in the store with its image
            body = InspectError(detail=result.reason or "", reason="store_degraded", result=result)
            return Response(body.model_dump_json(), status_code=503, media_type="application/json")
        if not decided.stored:
            body = InspectError(
                detail="the decision could not be stored; the part is held",
                reason="store_error",
                result=result.model_copy(update={"verdict": Verdict.review, "reason": "store_error"}),
            )
            return Response(body.model_dump_json(), status_code=503, media_type="application/json")
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get("/v1/results/{request_id}", response_model=InspectionResult, dependencies=[api_auth])
    async def get_result(request_id: str) -> Response:
        result = await run_in_threadpool(rt.store.get_inspection, request_id)
        if result is None:
            raise HTTPException(404, f"no decision with request id {request_id!r}")
        return Response(result.model_dump_json(), media_type="application/json")

    @app.post("/v1/admin/reload", dependencies=[api_auth], summary="Check the registry alias now (hot swap)")
    async def reload() -> JSONResponse:
        if rt.swapper is None:
            raise HTTPException(409, "this runner has no registry configured")
        outcome = await run_in_threadpool(rt.swapper.check, True)
        current = rt.holder.current
        return JSONResponse(
            {
                "outcome": outcome,
                "version": current.version if current else None,
                "error": rt.swapper.last_error,
            }
        )

    @app.get("/healthz", dependencies=[health_auth])
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", dependencies=[health_auth])
    async def readyz() -> JSONResponse:
        current = rt.holder.current
        body: dict[str, Any] = {
            "ready": current is not None,
            "station": config.station,
            "model_version": current.version if current else None,
            "provider": current.provider if current else None,
            "queue_depth": rt.batcher.depth,
        }
        if current is None and rt.swapper is not None:
            body["error"] = rt.swapper.last_error
        reasons = rt.degraded_reasons()
        body["degraded"] = bool(reasons) and current is not None  # serving, but something needs a look
        body["degraded_reasons"] = reasons
        if rt.draining.is_set():
            body["ready"], body["draining"] = False, True
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", dependencies=[metrics_auth])
    async def metrics() -> Response:
        rt.metrics.queue_depth.set(rt.batcher.depth)
        body = rt.metrics.render()
        if rt.drift is not None:
            body += ("\n".join(rt.drift.prometheus_lines()) + "\n").encode()
        return Response(body, media_type=rt.metrics.content_type)

    return app


def run_runner(config: RunnerConfig) -> None:
    """Serve until interrupted (blocking): HTTP on config.http, plus folder mode and MQTT when configured."""
    import uvicorn

    app = create_app(config)
    kwargs: dict[str, Any] = {"log_level": "info", "access_log": False}
    try:
        import httptools  # noqa: F401

        kwargs["http"] = "httptools"
    except ImportError:
        pass
    logger.info(
        "runner for station %s: registry %s alias %s, store %s, http %s:%d",
        config.station,
        config.registry,
        config.alias,
        config.store,
        config.http.host,
        config.http.port,
    )
    # after the drain, parts still in flight get up to their timeout (plus a margin) before uvicorn gives up
    server_config = uvicorn.Config(
        app,
        host=config.http.host,
        port=config.http.port,
        timeout_graceful_shutdown=int(config.batching.timeout_s) + 2,
        **kwargs,
    )
    draining_server(server_config, runtime_of(app), config.drain_s).run()


def draining_server(config: Any, runtime: Runtime, drain_s: float) -> Any:
    """uvicorn's Server with a drain on SIGTERM/SIGINT: for `drain_s` the runner keeps its port open, holds every
    new part (503 + stored `review`: a client on an open connection gets an answer and a decision instead of a
    reset) and reports /readyz 503, while in-flight parts are answered; then uvicorn's own graceful shutdown
    (in-flight requests finish, the lifespan stops the runtime). A second signal ends the drain at once."""
    import uvicorn

    class _DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if drain_s <= 0 or runtime.draining.is_set():
                super().handle_exit(sig, frame)
                return
            runtime.begin_drain()
            timer = threading.Timer(drain_s, lambda: setattr(self, "should_exit", True))
            timer.daemon = True
            timer.start()

    return _DrainingServer(config)


def runtime_of(app: FastAPI) -> Runtime:
    return app.state.runtime
