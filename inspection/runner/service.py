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

Authentication: unauthenticated requests are refused before anything is stored (they must not be able to fill
the store); the bearer token comes from INSPECTION_RUNNER_TOKEN or the config.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
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
from inspection.decisions import DecisionStore
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
    result: InspectionResult
    stored: bool


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
        stored = True
        try:
            self.store.record_many([(results[i], pending[i].data, preds[i].heatmap, pending[i].source) for i in owned])
        except Exception:
            logger.exception("decision store write failed for %d parts: answering 503 + review", len(owned))
            self.metrics.errors.labels("store").inc(len(owned))
            stored = False
        out: list[Decided | None] = [None] * len(pending)
        for i in owned:
            out[i] = Decided(preds[i], results[i], stored)
            if not stored:
                continue
            try:  # the decision is stored: telemetry trouble must not turn it into an error
                self.after_record(results[i], pending[i].source)
                self.observe_drift(images[i], preds[i].score, results[i].verdict.value, preds[i].version)
            except Exception:
                logger.exception("metrics/MQTT/drift failed after storing %s", results[i].request_id)
        return out

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
            await run_in_threadpool(rt.store.record_inspection, result, keep, None, "http")
        except Exception:
            logger.exception("decision store write failed for held request %s", request_id)
            rt.metrics.errors.labels("store").inc()
            status = 503
        else:
            rt.after_record(result, "http")
        logger.warning("request %s part %s held (%s): %s", request_id, part_id, reason, message)
        body = InspectError(detail=message, reason=reason, result=result)
        return Response(body.model_dump_json(), status_code=status, media_type="application/json")

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
        return JSONResponse(body, status_code=200 if current is not None else 503)

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
    uvicorn.run(app, host=config.http.host, port=config.http.port, **kwargs)


def runtime_of(app: FastAPI) -> Runtime:
    return app.state.runtime
