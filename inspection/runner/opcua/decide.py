"""One part from an OPC UA call through the runner's one decision path (the same as POST /v1/inspect).

`inspect_bytes` is the HTTP handler's sequence for a caller that already holds the image bytes: decode, hand the
frame with a `Pending` to the micro-batcher, whose worker decides and stores the model verdict with its batch
(`Runtime.finish_batch`); anything else — bad image, no model, overload, timeout, model error — is a stored
`review` with the reason code, exactly as HTTP stores it. `read_image_file` is what `Inspect(part_id,
image_path)` adds in front: the path must lie under a configured image root (a client must not make the runner
read, and keep for QA, arbitrary files), and an unreadable file is a held part like an unreadable image.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from inspection.errors import ImageValidationError
from inspection.images import decode_image
from inspection.runner.batcher import NoModelError, OverloadedError
from inspection.runner.products import ProductError
from inspection.runner.runtime import Decided, Pending
from inspection.schemas import InspectionResult, Verdict

if TYPE_CHECKING:
    from inspection.runner.runtime import Runtime

logger = logging.getLogger(__name__)

SOURCE = "opcua"


class HeldPart(Exception):
    """Internal: this part ends as a stored `review` with `reason` (a code) and a message."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def reason_code(result: InspectionResult) -> str:
    """The machine-readable code in front of `reason` ("truncated: ..." -> "truncated"); "" for a model verdict."""
    return (result.reason or "").split(":", 1)[0].strip()


def read_image_file(path_text: str, roots: tuple[Path, ...], max_bytes: int) -> bytes:
    """The bytes of an image the camera wrote, if `path_text` resolves (symlinks too) to a file under a root."""
    if not roots:
        raise HeldPart("path_not_allowed", "Inspect by path is off: set opcua.image_roots to the camera's folder")
    if not path_text or "\x00" in path_text:
        raise HeldPart("bad_field", "image_path is empty or not a path")
    real = Path(os.path.realpath(path_text))
    if not any(real.is_relative_to(Path(os.path.realpath(r))) for r in roots):
        allowed = [str(r) for r in roots]
        raise HeldPart("path_not_allowed", f"{path_text[:200]!r} is not under the image roots {allowed}")
    try:
        with open(real, "rb") as fh:
            return fh.read(max_bytes + 1)  # one byte over: decode_image reports too_large_file
    except FileNotFoundError:
        raise HeldPart("missing_file", f"{path_text[:200]!r} does not exist") from None
    except (IsADirectoryError, PermissionError, OSError) as exc:
        raise HeldPart("unreadable_file", f"{path_text[:200]!r}: {type(exc).__name__}: {exc}"[:300]) from None


async def inspect_bytes(
    rt: Runtime,
    data: bytes,
    part_id: str | None,
    station: str,
    t0: float | None = None,
    held: HeldPart | None = None,
) -> InspectionResult:
    """Decide one part (see the module docstring) with the model of the station's product. `held`: the part is
    already known to be held (the caller could not get its bytes); it is stored as such. Never raises for a part."""
    t0 = time.perf_counter() if t0 is None else t0
    request_id = uuid.uuid4().hex
    pid = part_id or "unknown"
    timeout = rt.config.batching.timeout_s
    product = rt.config.product_for_station(station)

    async def hold(reason: str, message: str) -> InspectionResult:
        """Store a `review` decision without a model verdict (the HTTP handler's `held`, without the HTTP)."""
        result, stored = await rt.hold_part(SOURCE, reason, message, request_id, pid, station, t0, data, product)
        if not stored:
            return result.model_copy(update={"reason": f"store_error: {result.reason}"})
        logger.warning("OPC UA request %s part %s held (%s): %s", request_id, pid, reason, message)
        return result

    with rt.incoming.track():
        try:
            if held is not None:
                raise held
            if part_id is None:
                raise HeldPart("missing_part_id", "part_id is required")
            try:
                slot = rt.slot_for_station(station)  # a station is fixed to one product (checked at start)
            except ProductError as exc:
                raise HeldPart(exc.reason, exc.message) from None
            image = decode_image(data, rt.config.image_limits)
            sha = hashlib.sha256(data).hexdigest()
            pending = Pending(request_id, pid, station, t0, data, sha, SOURCE, product=slot.product)
            future = slot.batcher.submit(image, pending)
        except HeldPart as exc:
            return await hold(exc.reason, exc.message)
        except ImageValidationError as exc:
            return await hold(exc.reason, exc.detail)
        except (NoModelError, OverloadedError) as exc:
            reason = "no_model" if isinstance(exc, NoModelError) else "overloaded"
            return await hold(reason, str(exc))
    waiting = asyncio.wrap_future(future)
    try:
        try:
            decided: Decided | None = await asyncio.wait_for(asyncio.shield(waiting), timeout)
        except TimeoutError:
            if pending.claim():  # as in HTTP: the worker has not taken it, so it is held and the worker skips it
                future.cancel()
                msg = f"no model verdict within {timeout} s"
                return await hold("timeout", msg)
            decided = await waiting  # the worker owns it and is storing its verdict right now
    except NoModelError as exc:
        return await hold("no_model", str(exc))
    except Exception as exc:  # the model failed on this batch: hold the part
        msg = f"{type(exc).__name__}: {exc}"[:500]
        return await hold("model_error", msg)
    if decided is None:  # cannot happen: only a part claimed by a timeout is skipped, and that one returned
        raise RuntimeError(f"request {request_id}: the worker skipped a part nobody held")
    if not decided.stored:
        reason = "store_error: the decision could not be stored; the part is held"
        return decided.result.model_copy(update={"verdict": Verdict.review, "reason": reason})
    return decided.result
