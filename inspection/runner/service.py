"""The runner's HTTP service (FastAPI) over the runtime (runtime.py: products, decision path, store health).

The fail-closed rules are the runtime's (see runtime.py); here they mean: bad input -> 4xx with the reason code and
the stored `review` decision; no model, model error, overload or timeout -> 503 and the stored `review`; every
decision is in the store before its answer. A request picks its product with the `product` query or form field or
`X-Product` (else its station's fixed product, else the runner's default; products.py): a product the runner does
not serve is a 400 `unknown_product` with a stored `review`, like any other bad input.

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
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from inspection import __version__
from inspection.errors import ImageValidationError
from inspection.images import decode_image
from inspection.runner.batcher import NoModelError, OverloadedError
from inspection.runner.config import RunnerConfig
from inspection.runner.products import ProductError
from inspection.runner.runtime import Decided, Pending, Runtime
from inspection.schemas import InspectionResult, Verdict

__all__ = ["Decided", "InspectError", "Pending", "Runtime", "create_app", "draining_server", "run_runner"]

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
    "unknown_product": 400,  # products.py: not served here, contradicting the station's, or none named
    "product_mismatch": 400,
    "missing_product": 400,
}
_ID_RE = re.compile(r"^[\w.\-:/#]{1,256}$")  # part ids and stations as PLCs send them; no spaces/control chars
IMAGE_CONTENT_TYPES = ("image/", "application/octet-stream")


class InspectError(BaseModel):
    """Body of a 4xx/503 answer to /v1/inspect: why, and the stored `review` decision (the part is held)."""

    detail: str
    reason: str
    result: InspectionResult | None


class _Held(Exception):
    """Internal: this request ends with a stored `review` decision and an error status."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


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
        status: int,
        reason: str,
        message: str,
        request_id: str,
        part_id: str,
        station: str,
        t0: float,
        data: bytes,
        product: str | None,
    ) -> Response:
        result, stored = await rt.hold_part(
            "http", reason, message, request_id, part_id, station, t0, data, product, run_in_threadpool
        )
        if not stored:
            body = InspectError(
                detail=f"{message}; the hold could not be stored either",
                reason="store_error",
                result=result.model_copy(update={"reason": f"store_error: {result.reason}"}),
            )
            return Response(body.model_dump_json(), status_code=503, media_type="application/json")
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
    async def inspect(
        request: Request, part_id: str | None = None, station: str | None = None, product: str | None = None
    ) -> Response:
        """`part_id`, `station` and `product` come from the query, the multipart form, or the `X-Part-Id` /
        `X-Station` / `X-Product` headers; the station defaults to the runner's own, the product to the station's
        fixed one or the runner's default."""
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        data = b""
        pid = sid = prod = None
        image: np.ndarray | None = None
        with rt.incoming.track():
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
                    prod = _field(product, "product") or _field(form.get("product"), "product")
                    if upload is None or isinstance(upload, str):
                        raise _Held(400, "missing_file", "multipart body has no file field named 'file'")
                    data = await upload.read(limits.max_bytes + 1)
                    await form.close()
                else:
                    pid = _field(part_id, "part_id")
                    sid = _field(station, "station")
                    prod = _field(product, "product")
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
                prod = prod or _field(request.headers.get("x-product"), "X-Product")
                if pid is None:
                    raise _Held(400, "missing_part_id", "part_id is required (query, form field or X-Part-Id)")
                try:
                    slot = rt.resolve(prod, sid or config.station)
                except ProductError as exc:
                    raise _Held(STATUS_FOR_REASON.get(exc.reason, 400), exc.reason, exc.message) from None
                prod = slot.product
                if rt.draining.is_set() and t0 >= rt.draining_since:  # one that came before the signal is answered
                    raise _Held(503, "shutting_down", "the runner is shutting down; the part is held")
                image = decode_image(data, limits)
                sha = hashlib.sha256(data).hexdigest()
                pending = Pending(request_id, pid, sid or config.station, t0, data, sha, product=prod)
                future = slot.batcher.submit(image, pending)
            except _Held as exc:
                return await held(
                    exc.status,
                    exc.reason,
                    exc.message,
                    request_id,
                    pid or "unknown",
                    sid or config.station,
                    t0,
                    data,
                    _known(prod) if prod is not None else config.product_for_station(sid or config.station),
                )
            except ImageValidationError as exc:
                status = STATUS_FOR_REASON.get(exc.reason, 422)
                return await held(
                    status, exc.reason, exc.detail, request_id, pid or "unknown", sid or config.station, t0, data, prod
                )
            except (NoModelError, OverloadedError) as exc:
                reason = "no_model" if isinstance(exc, NoModelError) else "overloaded"
                return await held(503, reason, str(exc), request_id, pid, sid or config.station, t0, data, prod)
        station_id = sid or config.station
        waiting = asyncio.wrap_future(future)
        try:
            try:
                decided: Decided | None = await asyncio.wait_for(asyncio.shield(waiting), timeout)
            except TimeoutError:
                if pending.claim():  # the worker has not taken this part: it is held, the worker will skip it
                    future.cancel()
                    msg = f"no model verdict within {timeout} s"
                    return await held(503, "timeout", msg, request_id, pid, station_id, t0, data, prod)
                decided = await waiting  # the worker owns it and is storing its verdict right now
        except NoModelError as exc:
            return await held(503, "no_model", str(exc), request_id, pid, station_id, t0, data, prod)
        except Exception as exc:  # the model failed on this batch: hold the part
            msg = f"{type(exc).__name__}: {exc}"[:500]
            return await held(503, "model_error", msg, request_id, pid, station_id, t0, data, prod)
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

    def product_slot(product: str | None):
        if product is None:
            return rt.slot
        slot = rt.slots.get(product)
        if slot is None:
            raise HTTPException(404, f"product {product!r} is not served here; served: {', '.join(rt.slots)}")
        return slot

    @app.post("/v1/admin/reload", dependencies=[api_auth], summary="Check the registry alias now (hot swap)")
    async def reload(product: str | None = None) -> JSONResponse:
        """`product`: check that product's alias only; without it every product's (the answer's top level is the
        default product's, `products` has each)."""
        chosen = [product_slot(product)] if product is not None else list(rt.slots.values())
        if any(s.swapper is None for s in chosen):
            raise HTTPException(409, "this runner has no registry configured")
        answers = {}
        for slot in chosen:
            outcome = await run_in_threadpool(slot.swapper.check, True)
            current = slot.holder.current
            answers[slot.product] = {
                "outcome": outcome,
                "version": current.version if current else None,
                "error": slot.swapper.last_error,
            }
        top = answers.get(product or rt.default_product) or next(iter(answers.values()))
        return JSONResponse({**top, "products": answers})

    @app.get("/healthz", dependencies=[health_auth])
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", dependencies=[health_auth])
    async def readyz(product: str | None = None) -> JSONResponse:
        """Ready when every product served has a verified model (`product`: that product only). The top level
        names the default product's model (or `product`'s); `products` has each product's state."""
        chosen = product_slot(product)
        slots = [chosen] if product is not None else list(rt.slots.values())
        current = chosen.holder.current
        body: dict[str, Any] = {
            "ready": all(s.holder.current is not None for s in slots),
            "station": config.station,
            "product": chosen.product,
            "model_version": current.version if current else None,
            "provider": current.provider if current else None,
            "queue_depth": sum(s.batcher.depth for s in slots),
        }
        if current is None and chosen.swapper is not None:
            body["error"] = chosen.swapper.last_error
        reasons = rt.degraded_reasons()
        serving = any(s.holder.current is not None for s in slots)
        body["degraded"] = bool(reasons) and serving  # serving, but something needs a look
        body["degraded_reasons"] = reasons
        body["products"] = {s.product: s.status() for s in rt.slots.values()}
        if rt.draining.is_set():
            body["ready"], body["draining"] = False, True
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", dependencies=[metrics_auth])
    async def metrics() -> Response:
        rt.metrics.queue_depth.set(sum(s.batcher.depth for s in rt.slots.values()))
        body = rt.metrics.render() + drift_metrics(rt).encode()
        return Response(body, media_type=rt.metrics.content_type)

    return app


def _known(product: str | None) -> str | None:
    """A product name worth storing with a held part: what the request named, if it is a plausible name."""
    from inspection.errors import RegistryError
    from inspection.registry import check_product

    try:
        return check_product(product) if product is not None else None
    except RegistryError:
        return None


def drift_metrics(rt: Runtime) -> str:
    """The drift monitors' lines for /metrics: one product as the monitor writes them (unlabelled), several with a
    `product` label on each sample (one HELP/TYPE per metric)."""
    monitors = {p: s.drift for p, s in rt.slots.items() if s.drift is not None}
    if not monitors:
        return ""
    if len(rt.slots) == 1:
        return "\n".join(next(iter(monitors.values())).prometheus_lines()) + "\n"
    lines: list[str] = []
    seen: set[str] = set()
    for product, monitor in monitors.items():
        for line in monitor.prometheus_lines():
            if line.startswith("#"):
                if line not in seen:
                    seen.add(line)
                    lines.append(line)
                continue
            name, _, value = line.rpartition(" ")
            label = f'product="{product}"'
            name = name.replace("{", "{" + label + ",", 1) if "{" in name else f"{name}{{{label}}}"
            lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"


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
        "runner for station %s: registry %s alias %s of products %s, store %s, http %s:%d",
        config.station,
        config.registry,
        config.alias,
        ", ".join(config.served_products),
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
