"""The QA review web app: FastAPI with server-rendered Jinja2 pages and one small keyboard script.

Every page, image and action needs a live session (`auth.Auth`); every POST needs the session's CSRF token.
Decisions are appended to the decision store's `reviews` table through `queries` (never updated or deleted).
Nothing is fetched from outside at run time: styles, script and charts are served by the app itself.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import cv2
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from inspection.decisions import DecisionStore, DecisionStoreError
from inspection.review import queries, stats
from inspection.review.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Auth, AuthError, Session, tokens_equal
from inspection.review.config import ROLES, ReviewConfig
from inspection.schemas import DefectType

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFECT_TYPES = [(d.value, d.value.replace("_", "/")) for d in DefectType]  # value, label (burr/flash)
ACTION_LABELS = {"confirm_defect": "Confirmed defect", "override_ok": "Override: OK", "undo": "Undo"}
MESSAGES = {  # fixed texts for ?msg=..., so nothing from the URL is ever echoed into the page
    "decided": "Decision saved.",
    "undone": "Decision undone.",
    "nothing_to_undo": "Nothing of yours to undo.",
    "logged_out": "You are logged out.",
    "user_added": "User added.",
    "user_changed": "User changed.",
    "queue_empty": "The queue is empty: nothing is waiting for a decision.",
}
SECURITY_HEADERS = {
    # Everything comes from this origin; no inline script, no framing, no referrer to other sites.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


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


def create_app(config: ReviewConfig, store: DecisionStore | None = None) -> FastAPI:
    """The review app on `config.store` (or on an already open `store`)."""
    if store is None:
        if not config.store:
            raise queries.ReviewError("no decision store given: set review.store or pass --store DB_OR_DIR")
        store = DecisionStore(config.store, config.media_dir)
    auth = Auth(
        store.engine,
        session_hours=config.session_hours,
        min_password_length=config.min_password_length,
        max_login_failures=config.max_login_failures,
        login_lockout_s=config.login_lockout_s,
        password_time_cost=config.password_time_cost,
        password_memory_kib=config.password_memory_kib,
    )
    zone = ZoneInfo(config.display_timezone)
    media_root = store.media_dir.resolve()

    app = FastAPI(title=config.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.store = store
    app.state.auth = auth
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")  # .html templates autoescape
    env = templates.env
    env.filters["dt"] = lambda v: "" if v is None else v.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")
    env.filters["score"] = lambda v: "—" if v is None else f"{v:.3f}"
    env.filters["pct"] = lambda v: "—" if v is None else f"{100 * v:.1f} %"
    env.filters["defect_label"] = lambda v: (v or "").replace("_", "/")
    env.globals.update(
        title=config.title,
        tz_name=config.display_timezone,
        defect_types=DEFECT_TYPES,
        action_labels=ACTION_LABELS,
        roles=ROLES,
    )

    # -- helpers -------------------------------------------------------------------------------------------

    def session_of(request: Request) -> Session | None:
        return auth.session_from_cookie(request.cookies.get(SESSION_COOKIE))

    def require(request: Request, admin: bool = False, redirect: bool = True) -> Session:
        session = session_of(request)
        if session is None:
            raise LoginRequired(redirect)
        if admin and not session.user.is_admin:
            raise Forbidden("This page is for admins only.")
        return session

    async def require_post(request: Request, admin: bool = False) -> tuple[Session, Any]:
        session = require(request, admin=admin)
        form = await request.form()
        token = form.get("csrf_token") or request.headers.get("x-csrf-token")
        if not tokens_equal(session.csrf_token, str(token) if token else None):
            raise Forbidden("The form was missing its security token (or it expired). Reload the page and try again.")
        return session, form

    def render(request: Request, name: str, session: Session | None, status_code: int = 200, **ctx: Any) -> Response:
        msg = request.query_params.get("msg")
        ctx.setdefault("message", MESSAGES.get(msg or ""))
        ctx.setdefault("error", None)
        ctx.update(session=session, user=session.user if session else None, csrf=session.csrf_token if session else "")
        if session is not None and "waiting_total" not in ctx:
            ctx["waiting_total"] = queries.count_waiting(store)
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    def parse_time(value: str | None, name: str) -> datetime | None:
        if not value:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"{name}: {value!r} is not a date/time like 2024-05-01T06:00") from None
        return parsed.replace(tzinfo=zone) if parsed.tzinfo is None else parsed

    def filters_from(params: Any) -> queries.QueueFilters:
        try:
            return queries.QueueFilters(
                station=params.get("station") or None,
                verdict=params.get("verdict") or None,
                model_version=params.get("model_version") or None,
                since=parse_time(params.get("since"), "since"),
                until=parse_time(params.get("until"), "until"),
                status=params.get("status") or "waiting",
            )
        except queries.ReviewError as exc:
            raise BadRequest(str(exc)) from None

    def filter_query(f: queries.QueueFilters) -> str:
        """The filters as a query string (without '?'), so part pages and decisions keep the queue's view."""
        items = {
            "station": f.station or "",
            "verdict": f.verdict or "",
            "model_version": f.model_version or "",
            "since": f.since.astimezone(zone).strftime("%Y-%m-%dT%H:%M") if f.since else "",
            "until": f.until.astimezone(zone).strftime("%Y-%m-%dT%H:%M") if f.until else "",
            "status": "" if f.status == "waiting" else f.status,
        }
        return urlencode({k: v for k, v in items.items() if v})

    def part_url(request_id: str, q: str, **extra: str) -> str:
        query = "&".join(p for p in (q, urlencode(extra) if extra else "") if p)
        return f"/parts/{request_id}" + (f"?{query}" if query else "")

    def redirect(url: str) -> RedirectResponse:
        return RedirectResponse(url, status_code=303)

    # -- errors and headers --------------------------------------------------------------------------------

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        if exc.redirect:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method != "GET":
                target = "/queue"
            return redirect("/login?" + urlencode({"next": target}))
        return JSONResponse({"detail": "login required"}, status_code=401)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "error.html", session_of(request), status_code=403, error=exc.message)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> Response:
        return render(request, "error.html", session_of(request), status_code=400, error=exc.message)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if not request.url.path.startswith(("/static/", "/media/")):
            response.headers.setdefault("Cache-Control", "no-store")  # pages hold live state and CSRF tokens
        return response

    def set_cookie(response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name, value, max_age=max_age, httponly=True, samesite="lax", secure=config.cookie_secure, path="/"
        )

    # -- login / logout ------------------------------------------------------------------------------------

    def safe_next(value: str | None) -> str:
        # only paths inside this app: '//evil.example' or 'https://...' would be an open redirect
        if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
            return value
        return "/queue"

    def login_page(request: Request, status_code: int = 200, error: str | None = None) -> Response:
        token, cookie = auth.new_login_csrf()
        response = render(
            request,
            "login.html",
            None,
            status_code=status_code,
            error=error,
            login_csrf=token,
            next=safe_next(request.query_params.get("next")),
        )
        set_cookie(response, LOGIN_CSRF_COOKIE, cookie, 3600)
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        if session_of(request) is not None:
            return redirect(safe_next(request.query_params.get("next")))
        return login_page(request)

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        if not auth.check_login_csrf(request.cookies.get(LOGIN_CSRF_COOKIE), str(form.get("csrf_token") or "")):
            return login_page(request, 403, "The login form expired. Please try again.")
        username = str(form.get("username") or "").strip()
        user = auth.authenticate(username, str(form.get("password") or ""))
        if user is None:
            text = "Wrong user name or password."
            if auth.locked_out(username):
                text = "Too many failed logins for this user: wait a few minutes, or ask an admin."
            return login_page(request, 401, text)
        response = redirect(safe_next(str(form.get("next") or "")))
        set_cookie(response, SESSION_COOKIE, auth.create_session(user), int(config.session_hours * 3600))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        logger.info("login: %s", user.username)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session, _ = await require_post(request)
        auth.end_session(request.cookies.get(SESSION_COOKIE))
        response = redirect("/login?msg=logged_out")
        response.delete_cookie(SESSION_COOKIE, path="/")
        logger.info("logout: %s", session.user.username)
        return response

    # -- queue ---------------------------------------------------------------------------------------------

    @app.get("/")
    def home(request: Request) -> Response:
        require(request)
        return redirect("/queue")

    @app.get("/queue", response_class=HTMLResponse)
    def queue_page(request: Request) -> Response:
        session = require(request)
        f = filters_from(request.query_params)
        try:
            page = max(1, int(request.query_params.get("page") or 1))
        except ValueError:
            raise BadRequest(f"page: {request.query_params.get('page')!r} is not a page number") from None
        size = config.page_size
        total = queries.count_queue(store, f)
        items = queries.queue(store, f, limit=size, offset=(page - 1) * size)
        q = filter_query(f)
        return render(
            request,
            "queue.html",
            session,
            filters=f,
            q=q,
            items=items,
            total=total,
            waiting=queries.count_waiting(store, f),
            page=page,
            pages=max(1, -(-total // size)),
            options=queries.filter_options(store),
            since_value=f.since.astimezone(zone).strftime("%Y-%m-%dT%H:%M") if f.since else "",
            until_value=f.until.astimezone(zone).strftime("%Y-%m-%dT%H:%M") if f.until else "",
            first_waiting=queries.next_waiting(store, None, f),
            part_url=part_url,
        )

    @app.get("/api/queue")
    def api_queue(request: Request) -> Response:
        require(request, redirect=False)
        f = filters_from(request.query_params)
        items = queries.queue(store, f, limit=config.page_size)
        return JSONResponse(
            {
                "waiting": queries.count_waiting(store, f),
                "total": queries.count_queue(store, f),
                "items": [
                    {
                        "request_id": i.request_id,
                        "part_id": i.part_id,
                        "station": i.station,
                        "timestamp": i.timestamp.isoformat(),
                        "verdict": i.verdict,
                        "defect_score": i.defect_score,
                        "model_version": i.model_version,
                        "decision": i.decision,
                        "defect_type": i.defect_type,
                        "reviewer": i.reviewer,
                    }
                    for i in items
                ],
            }
        )

    # -- one part ------------------------------------------------------------------------------------------

    def part_response(
        request: Request,
        session: Session,
        request_id: str,
        f: queries.QueueFilters,
        status_code: int = 200,
        **extra: Any,
    ) -> Response:
        detail = queries.part_detail(store, request_id)
        if detail is None:
            error = f"No part with request id {request_id}."
            return render(request, "error.html", session, status_code=404, error=error)
        q = filter_query(f)
        prev_id, next_id = queries.neighbours(store, request_id, f)
        row = detail.row
        own_current = detail.current is not None and (
            detail.current["reviewer"] == session.user.username or session.user.is_admin
        )
        return render(
            request,
            "part.html",
            session,
            status_code=status_code,
            row=row,
            detail=detail,
            q=q,
            prev_url=part_url(prev_id, q) if prev_id else None,
            next_url=part_url(next_id, q) if next_id else None,
            prev_id=prev_id,
            next_id=next_id,
            queue_url="/queue" + (f"?{q}" if q else ""),
            waiting=queries.count_waiting(store, f),
            can_undo_here=own_current,
            flagged=row["verdict"] in queries.FLAGGED_VERDICTS,
            gauge=score_gauge_svg(row["defect_score"], row["review_threshold"], row["reject_threshold"]),
            **extra,
        )

    @app.get("/parts/{request_id}", response_class=HTMLResponse)
    def part_page(request: Request, request_id: str) -> Response:
        session = require(request)
        last = request.query_params.get("last")
        last_row = store.get_row(last) if last else None  # "saved: part X" after a decision moved us on
        return part_response(request, session, request_id, filters_from(request.query_params), last_part=last_row)

    @app.post("/parts/{request_id}/decision")
    async def decide(request: Request, request_id: str) -> Response:
        session, form = await require_post(request)
        q = str(form.get("q") or "")
        f = filters_from(_QueryParams(q))
        expected_raw = str(form.get("expected") or "")
        try:
            expected: int | None = int(expected_raw) if expected_raw else None
        except ValueError:
            raise BadRequest(f"expected: {expected_raw!r} is not a decision id") from None
        try:
            queries.record_decision(
                store,
                request_id,
                str(form.get("action") or ""),
                session.user.username,
                defect_type=str(form.get("defect_type") or "") or None,
                comment=str(form.get("comment") or ""),
                expected_current=expected,
            )
        except queries.DecisionConflict as exc:
            return part_response(request, session, request_id, f, status_code=409, error=str(exc))
        except queries.ReviewError as exc:
            raise BadRequest(str(exc)) from None
        nxt = queries.next_waiting(store, request_id, f)
        if nxt is None:
            return redirect("/queue" + (f"?{q}&" if q else "?") + "msg=queue_empty")
        return redirect(part_url(nxt, q, msg="decided", last=request_id))

    @app.post("/undo")
    async def undo(request: Request) -> Response:
        session, form = await require_post(request)
        q = str(form.get("q") or "")
        target = str(form.get("request_id") or "") or None
        try:
            undone = queries.undo_decision(
                store, session.user.username, request_id=target, may_undo_others=session.user.is_admin
            )
        except queries.ReviewError as exc:
            raise Forbidden(str(exc)) from None
        if undone is None:
            back = part_url(target, q, msg="nothing_to_undo") if target else "/queue?msg=nothing_to_undo"
            return redirect(back)
        return redirect(part_url(undone, q, msg="undone"))

    # -- media ---------------------------------------------------------------------------------------------

    def media_file(request_id: str, column: str) -> Path:
        row = store.get_row(request_id)
        rel = row.get(column) if row else None
        if not rel:
            raise _NotFound()
        path = (media_root / rel).resolve()
        if not path.is_relative_to(media_root) or not path.is_file():
            # a path that leaves the media folder is never served, whatever the database says
            raise _NotFound()
        return path

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: Exception) -> Response:
        return Response("not found", status_code=404, media_type="text/plain")

    media_headers = {"Cache-Control": "private, max-age=86400"}  # a request id's image never changes

    @app.get("/media/{request_id}/image")
    def media_image(request: Request, request_id: str) -> Response:
        require(request, redirect=False)
        return FileResponse(media_file(request_id, "image_path"), headers=media_headers)

    @app.get("/media/{request_id}/heatmap")
    def media_heatmap(request: Request, request_id: str) -> Response:
        require(request, redirect=False)
        media_file(request_id, "heatmap_path")  # 404 unless the row names a map inside the media folder
        try:
            data = store.overlay_png(request_id)  # rendered here, not on the line: QA opens few parts
        except DecisionStoreError:
            logger.exception("heatmap of %s cannot be rendered", request_id)
            data = None
        if data is None:
            raise _NotFound()
        return Response(data, media_type="image/png", headers=media_headers)

    @app.get("/media/{request_id}/thumb")
    def media_thumb(request: Request, request_id: str) -> Response:
        require(request, redirect=False)
        data = _thumbnail(str(media_file(request_id, "image_path")))
        if data is None:
            raise _NotFound()
        return Response(data, media_type="image/jpeg", headers=media_headers)

    # -- statistics ----------------------------------------------------------------------------------------

    def stats_for(request: Request) -> stats.ReviewStats:
        params = request.query_params
        until = parse_time(params.get("until"), "until") or datetime.now(UTC)
        try:
            hours = float(params.get("hours") or config.stats_default_hours)
        except ValueError:
            raise BadRequest(f"hours: {params.get('hours')!r} is not a number of hours") from None
        if not 0 < hours <= 24 * 366:
            raise BadRequest(f"hours: {hours} is out of range (0 < hours <= 8784)")
        since = parse_time(params.get("since"), "since") or until - timedelta(hours=hours)
        if since >= until:
            raise BadRequest("since must be before until")
        return stats.compute_stats(store, since, until, station=params.get("station") or None)

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request) -> Response:
        session = require(request)
        s = stats_for(request)
        types = [(label, float(s.defects_by_type.get(value, 0))) for value, label in DEFECT_TYPES]
        types.append(("unspecified", float(s.defects_by_type.get("unspecified", 0))))
        versions = [(v.model_version, 100.0 * (v.override_rate or 0.0)) for v in s.per_version if v.decided]
        return render(
            request,
            "stats.html",
            session,
            s=s,
            flagged_svg=stats.flagged_chart_svg(s),
            types_svg=stats.hbar_chart_svg(types),
            versions_svg=stats.hbar_chart_svg(versions, "{:.1f} %") if versions else None,
            options=queries.filter_options(store),
            station=request.query_params.get("station") or "",
            hours=request.query_params.get("hours") or f"{config.stats_default_hours:g}",
            reject_colour=stats.REJECT_COLOUR,
            review_colour=stats.REVIEW_COLOUR,
        )

    @app.get("/api/stats")
    def api_stats(request: Request) -> Response:
        require(request, redirect=False)
        return JSONResponse(stats.stats_summary(stats_for(request)))

    # -- users (admin) -------------------------------------------------------------------------------------

    @app.get("/admin/users", response_class=HTMLResponse)
    def users_page(request: Request) -> Response:
        session = require(request, admin=True)
        return render(request, "users.html", session, users=auth.list_users(), min_len=config.min_password_length)

    @app.post("/admin/users")
    async def users_add(request: Request) -> Response:
        session, form = await require_post(request, admin=True)
        try:
            auth.add_user(
                str(form.get("username") or "").strip(),
                str(form.get("password") or ""),
                str(form.get("role") or ""),
                created_by=session.user.username,
            )
        except AuthError as exc:
            return render(
                request,
                "users.html",
                session,
                status_code=400,
                users=auth.list_users(),
                min_len=config.min_password_length,
                error=str(exc),
            )
        return redirect("/admin/users?msg=user_added")

    @app.post("/admin/users/{username}")
    async def users_change(request: Request, username: str) -> Response:
        session, form = await require_post(request, admin=True)
        change = str(form.get("change") or "")
        try:
            if username == session.user.username and change in ("disable", "role"):
                raise AuthError("you cannot disable yourself or change your own role (ask another admin)")
            if change == "disable":
                auth.set_active(username, False)
            elif change == "enable":
                auth.set_active(username, True)
            elif change == "role":
                auth.set_role(username, str(form.get("role") or ""))
            else:
                raise AuthError(f"change {change!r} is not allowed; allowed: disable, enable, role")
        except AuthError as exc:
            return render(
                request,
                "users.html",
                session,
                status_code=400,
                users=auth.list_users(),
                min_len=config.min_password_length,
                error=str(exc),
            )
        logger.info("admin %s: %s %s", session.user.username, change, username)
        return redirect("/admin/users?msg=user_changed")

    return app


class _NotFound(Exception):
    pass


class _QueryParams(dict):
    """The filters carried in a form field, parsed like a query string."""

    def __init__(self, query: str):
        from urllib.parse import parse_qsl

        super().__init__(parse_qsl(query))


@lru_cache(maxsize=1024)
def _thumbnail(path: str, size: int = 112) -> bytes | None:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = size / max(h, w)
    small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None


def score_gauge_svg(score: float | None, review: float | None, reject: float | None, width: int = 360) -> Markup:
    """A 0..1 scale with the pass / review / reject zones, the two thresholds and the part's score marked."""
    left, right, bar_y, bar_h = 10, 10, 22, 14
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + plot_w * min(max(v, 0.0), 1.0)

    parts = [
        f'<svg class="gauge" viewBox="0 0 {width} 64" role="img" aria-label="defect score against thresholds" '
        'xmlns="http://www.w3.org/2000/svg">'
    ]
    if review is not None and reject is not None:
        zones = [(0.0, review, "#dcfce7"), (review, reject, "#dbeafe"), (reject, 1.0, "#ffedd5")]
        for lo, hi, colour in zones:
            zone_w = max(0.0, x(hi) - x(lo))
            parts.append(f'<rect x="{x(lo):.1f}" y="{bar_y}" width="{zone_w:.1f}" height="{bar_h}" fill="{colour}"/>')
        for value, name in ((review, "review"), (reject, "reject")):
            parts.append(
                f'<line x1="{x(value):.1f}" x2="{x(value):.1f}" y1="{bar_y - 4}" y2="{bar_y + bar_h + 4}" '
                'stroke="#475569" stroke-width="1.5"/>'
            )
            parts.append(
                f'<text x="{x(value):.1f}" y="{bar_y + bar_h + 18}" text-anchor="middle" font-size="12" '
                f'fill="#334155">{escape(name)} {value:.2f}</text>'
            )
    else:
        parts.append(f'<rect x="{left}" y="{bar_y}" width="{plot_w}" height="{bar_h}" fill="#e2e8f0"/>')
    parts.append(f'<rect x="{left}" y="{bar_y}" width="{plot_w}" height="{bar_h}" fill="none" stroke="#cbd5e1"/>')
    if score is not None:
        sx = x(score)
        parts.append(
            f'<path d="M {sx - 7:.1f} 4 L {sx + 7:.1f} 4 L {sx:.1f} {bar_y + 2} Z" fill="#0f172a">'
            f"<title>score {score:.3f}</title></path>"
        )
        parts.append(
            f'<line x1="{sx:.1f}" x2="{sx:.1f}" y1="{bar_y}" y2="{bar_y + bar_h}" stroke="#0f172a" stroke-width="2.5"/>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
