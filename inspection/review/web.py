"""What every page of the review app shares: sessions and CSRF checks, rendering, filters in URLs, thumbnails.

`create_app` builds one `Web` and hands it to the route modules (`app`, `admin`, `conflicts`), so each module
only declares its routes.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode
from zoneinfo import ZoneInfo

import cv2
from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from inspection.decisions import DecisionStore
from inspection.review import parts, queries
from inspection.review.auth import SESSION_COOKIE, Auth, Session, tokens_equal
from inspection.review.config import ROLES, ReviewConfig
from inspection.review.types import TypeChoices, type_label
from inspection.schemas import DefectType

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFECT_TYPES = [(d.value, type_label(d.value)) for d in DefectType]  # QA's enum: value, label (burr/flash)
ACTION_LABELS = {"confirm_defect": "Confirmed defect", "override_ok": "Override: OK", "undo": "Undo"}
MESSAGES = {  # fixed texts for ?msg=..., so nothing from the URL is ever echoed into the page
    "decided": "Decision saved.",
    "undone": "Decision undone.",
    "nothing_to_undo": "Nothing of yours to undo.",
    "logged_out": "You are logged out.",
    "user_added": "User added.",
    "user_changed": "User changed.",
    "queue_empty": "The queue is empty: nothing is waiting for a decision.",
    "settled": "Part relabelled: every photo of it now carries one label.",
    "conflicts_empty": "No part has photos labelled both ways any more.",
}
SECURITY_HEADERS = {
    # Everything comes from this origin; no inline script, no framing, no referrer to other sites.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
MEDIA_HEADERS = {"Cache-Control": "private, max-age=86400"}  # a request id's (or a sha256's) image never changes


class LoginRequired(Exception):
    """No live session: pages redirect to the login form, images and API calls answer 401."""

    def __init__(self, redirect: bool):
        self.redirect = redirect


class Forbidden(Exception):
    def __init__(self, message: str):
        self.message = message


class BadRequest(Exception):
    def __init__(self, message: str):
        self.message = message


class NotFound(Exception):
    """Media that is not there (or not allowed): a bare 404, no page."""


class FormQuery(dict):
    """The filters carried in a form field, parsed like a query string."""

    def __init__(self, query: str):
        super().__init__(parse_qsl(query))


class Web:
    """The shared state and helpers of one app instance (see module docstring)."""

    def __init__(self, config: ReviewConfig, store: DecisionStore, auth: Auth):
        self.config = config
        self.store = store
        self.auth = auth
        self.zone = ZoneInfo(config.display_timezone)
        self.media_root = store.media_dir.resolve()
        self.window_s = config.part_window_s
        self.conflicts: Any = None  # conflicts.ConflictSource when an ingest store is configured
        self.types = TypeChoices(store, config.registry)  # the part form's defect types (model's, then QA's enum)
        self.templates = Jinja2Templates(directory=HERE / "templates")  # .html templates autoescape
        env = self.templates.env
        zone = self.zone
        env.filters["dt"] = lambda v: "" if v is None else v.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")
        env.filters["hm"] = lambda v: "" if v is None else v.astimezone(zone).strftime("%H:%M:%S")
        env.filters["score"] = lambda v: "—" if v is None else f"{v:.3f}"
        env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f} %"
        env.filters["defect_label"] = type_label
        env.globals.update(
            title=config.title,
            tz_name=config.display_timezone,
            defect_types=DEFECT_TYPES,
            action_labels=ACTION_LABELS,
            roles=ROLES,
        )

    # -- sessions ------------------------------------------------------------------------------------------

    def session_of(self, request: Request) -> Session | None:
        return self.auth.session_from_cookie(request.cookies.get(SESSION_COOKIE))

    def require(self, request: Request, admin: bool = False, redirect: bool = True) -> Session:
        session = self.session_of(request)
        if session is None:
            raise LoginRequired(redirect)
        if admin and not session.user.is_admin:
            raise Forbidden("This page is for admins only.")
        return session

    async def require_post(self, request: Request, admin: bool = False) -> tuple[Session, Any]:
        session = self.require(request, admin=admin)
        form = await request.form()
        token = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not tokens_equal(session.csrf_token, str(token) if token else None):
            raise Forbidden("The form was missing its security token (or it expired). Reload the page and try again.")
        return session, form

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name, value, max_age=max_age, httponly=True, samesite="lax", secure=self.config.cookie_secure, path="/"
        )

    # -- pages ---------------------------------------------------------------------------------------------

    def render(self, request: Request, name: str, session: Session | None, status_code: int = 200, **ctx: Any):
        msg = request.query_params.get("msg")
        ctx.setdefault("message", MESSAGES.get(msg or ""))
        ctx.setdefault("error", None)
        ctx.update(session=session, user=session.user if session else None, csrf=session.csrf_token if session else "")
        if session is not None and "waiting_total" not in ctx:
            ctx["waiting_total"] = parts.count_waiting(self.store, window_s=self.window_s)
        if session is not None and self.conflicts is not None and "conflicts_total" not in ctx:
            ctx["conflicts_total"] = self.conflicts.count()
        ctx.setdefault("conflicts_total", None)
        return self.templates.TemplateResponse(request, name, ctx, status_code=status_code)

    @staticmethod
    def redirect(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303)

    # -- filters in URLs -----------------------------------------------------------------------------------

    def parse_time(self, value: str | None, name: str) -> datetime | None:
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"{name}: {value!r} is not a date/time like 2024-05-01T06:00") from None
        return parsed.replace(tzinfo=self.zone) if parsed.tzinfo is None else parsed

    def filters_from(self, params: Any) -> queries.QueueFilters:
        try:
            return queries.QueueFilters(
                station=params.get("station") or None,
                verdict=params.get("verdict") or None,
                model_version=params.get("model_version") or None,
                since=self.parse_time(params.get("since"), "since"),
                until=self.parse_time(params.get("until"), "until"),
                status=params.get("status") or "waiting",
            )
        except queries.ReviewError as exc:
            raise BadRequest(str(exc)) from None

    def local_input(self, value: datetime | None) -> str:
        """A time as a datetime-local input value in the display zone."""
        return value.astimezone(self.zone).strftime("%Y-%m-%dT%H:%M") if value else ""

    def filter_query(self, f: queries.QueueFilters) -> str:
        """The filters as a query string (without '?'), so part pages and decisions keep the queue's view."""
        items = {
            "station": f.station or "",
            "verdict": f.verdict or "",
            "model_version": f.model_version or "",
            "since": self.local_input(f.since),
            "until": self.local_input(f.until),
            "status": "" if f.status == "waiting" else f.status,
        }
        return urlencode({k: v for k, v in items.items() if v})

    @staticmethod
    def part_url(request_id: str, q: str, **extra: str) -> str:
        query = "&".join(p for p in (q, urlencode(extra) if extra else "") if p)
        return f"/parts/{request_id}" + (f"?{query}" if query else "")

    # -- media ---------------------------------------------------------------------------------------------

    def media_file(self, request_id: str, column: str) -> Path:
        row = self.store.get_row(request_id)
        rel = row.get(column) if row else None
        if not rel:
            raise NotFound()
        path = (self.media_root / rel).resolve()
        if not path.is_relative_to(self.media_root) or not path.is_file():
            # a path that leaves the media folder is never served, whatever the database says
            raise NotFound()
        return path


@lru_cache(maxsize=2048)
def thumbnail(path: str, size: int = 112) -> bytes | None:
    """JPEG of the image at `path`, its longer side `size` pixels (cached: thumbnails of one file never change)."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = size / max(h, w)
    small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None
