"""The "same part, labels disagree" queue: physical parts of the ingest store whose photos carry both labels.

Ingest groups near-duplicate photos into physical parts (rotation- and flip-invariant) and keeps a part whose
photos were filed both as defect and as ok out of training, calibration and evaluation until it is settled
(`inspection.ingest.label_conflicts`). Here QA sees such a part's photos side by side, each with its current
label, and one decision (ok / defect) relabels every photo of it (`inspection.ingest.relabel_group`, the
session's user as reviewer): the labels go into the manifest's review labels, which outrank folder labels, so
the next ingest and retrain see one label and the part leaves this queue.

Needs `ReviewConfig.ingest_store` (`inspection review serve --ingest-store STORE`); without it the pages say so.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from inspection.errors import DataError
from inspection.ingest.manifest import LabelConflict, label_conflicts, manifest_path, relabel_group
from inspection.review.web import MEDIA_HEADERS, BadRequest, NotFound, Web, thumbnail

logger = logging.getLogger(__name__)

LABELS = ("ok", "defect")
CACHE_S = 5.0  # every page shows the count in its top bar: reading the whole manifest once per page is wasteful


class ConflictSource:
    """The label conflicts of one ingest store, read at most every CACHE_S seconds (and after each decision)."""

    def __init__(self, store: str | Path):
        self.store = Path(store)
        if not manifest_path(self.store).is_file():
            raise DataError(f"no ingest store at {self.store}: expected a folder holding manifest.sqlite")
        self.root = manifest_path(self.store).parent.resolve()
        self._lock = threading.Lock()
        self._cached: tuple[float, list[LabelConflict]] | None = None

    def all(self) -> list[LabelConflict]:
        """Every part labelled both ways, largest first."""
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CACHE_S:
                self._cached = (time.monotonic(), label_conflicts(self.store))
            return self._cached[1]

    def count(self) -> int:
        return len(self.all())

    def get(self, group_id: str) -> LabelConflict | None:
        return next((c for c in self.all() if c.group_id == group_id), None)

    def photo_path(self, group_id: str, sha256: str) -> Path:
        """The stored photo `sha256` of part `group_id`; NotFound unless it is one of its photos inside the store."""
        conflict = self.get(group_id)
        for sha, path, _ in conflict.photos if conflict else ():
            if sha == sha256:
                resolved = Path(path).resolve()
                if resolved.is_relative_to(self.root) and resolved.is_file():
                    return resolved
        raise NotFound()

    def settle(self, group_id: str, label: str, reviewer: str, seen: set[str] | None = None) -> int:
        """Relabel every photo of `group_id` as `label`; returns how many. `seen` (the photos the reviewer's page
        showed) must still be the part's labelled photos, else nothing is written."""
        if label not in LABELS:
            raise BadRequest(f"label {label!r} is not allowed; allowed: {', '.join(LABELS)}")
        with self._lock:
            self._cached = None
        conflict = self.get(group_id)
        if conflict is None:
            raise BadRequest(f"part {group_id} has no disagreeing labels (any more); nothing was changed")
        if seen is not None and seen != {sha for sha, _, _ in conflict.photos}:
            raise BadRequest(f"part {group_id} changed since the page was loaded; reload it and decide again")
        n = relabel_group(self.store, group_id, label, reviewer, datetime.now(UTC))
        with self._lock:
            self._cached = None
        logger.info("label conflict %s settled as %s by %s (%d photos)", group_id, label, reviewer, n)
        return n


def add_conflict_routes(app: FastAPI, web: Web) -> None:
    """/conflicts (the queue), /conflicts/{group_id} (one part), its decision and its photos."""

    def source() -> ConflictSource | None:
        return web.conflicts

    @app.get("/conflicts", response_class=HTMLResponse)
    def conflicts_page(request: Request) -> Response:
        session = web.require(request)
        src = source()
        items = src.all() if src else []
        return web.render(request, "conflicts.html", session, items=items, configured=src is not None)

    @app.get("/conflicts/{group_id}", response_class=HTMLResponse)
    def conflict_page(request: Request, group_id: str) -> Response:
        session = web.require(request)
        src = source()
        conflict = src.get(group_id) if src else None
        if conflict is None:
            error = f"No part {group_id} with disagreeing labels." if src else "No ingest store is configured."
            return web.render(request, "error.html", session, status_code=404, error=error)
        items = src.all()  # type: ignore[union-attr]
        position = next(i for i, c in enumerate(items) if c.group_id == group_id)
        by_label = {label: [(sha, lab) for sha, _, lab in conflict.photos if lab == label] for label in LABELS}
        return web.render(
            request,
            "conflict.html",
            session,
            conflict=conflict,
            by_label=by_label,
            seen=",".join(sha for sha, _, _ in conflict.photos),
            position=position + 1,
            n_items=len(items),
        )

    @app.post("/conflicts/{group_id}/decision")
    async def conflict_decide(request: Request, group_id: str) -> Response:
        session, form = await web.require_post(request)
        src = source()
        if src is None:
            raise BadRequest("No ingest store is configured: start the app with --ingest-store STORE.")
        seen_text = str(form.get("seen") or "")
        seen = {s for s in seen_text.split(",") if s} if seen_text else None
        try:
            src.settle(group_id, str(form.get("label") or ""), session.user.username, seen)
        except DataError as exc:
            raise BadRequest(str(exc)) from None
        remaining = src.all()
        if not remaining:
            return web.redirect("/conflicts?msg=conflicts_empty")
        return web.redirect(f"/conflicts/{remaining[0].group_id}?msg=settled")

    @app.get("/conflicts/{group_id}/photos/{sha256}")
    def conflict_photo(request: Request, group_id: str, sha256: str) -> Response:
        web.require(request, redirect=False)
        src = source()
        if src is None:
            raise NotFound()
        path = src.photo_path(group_id, sha256)
        if request.query_params.get("size") == "thumb":
            data = thumbnail(str(path), 200)
            if data is None:
                raise NotFound()
            return Response(data, media_type="image/jpeg", headers=MEDIA_HEADERS)

        return FileResponse(path, headers=MEDIA_HEADERS)
