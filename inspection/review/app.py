"""The QA review web app: FastAPI with server-rendered Jinja2 pages and one small keyboard script.

Every page, image and action needs a live session (`auth.Auth`); every POST needs the session's CSRF token.
Decisions are appended to the decision store's `reviews` table through `parts` / `queries` (never updated or
deleted). The queue lists parts, not photos (`parts`: repeated photos of one part collapse into one row and one
decision). With an ingest store configured, parts whose photos carry both labels get their own queue
(`conflicts`). Nothing is fetched from outside at run time: styles, script and charts are served by the app.

Route modules: this one (login, queue, part pages, decisions, media, statistics), `admin` (users) and
`conflicts`; the helpers they share are in `web`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from inspection.decisions import DecisionStore, DecisionStoreError
from inspection.review import parts, queries, stats
from inspection.review.admin import add_admin_routes
from inspection.review.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Auth
from inspection.review.config import ReviewConfig
from inspection.review.conflicts import ConflictSource, add_conflict_routes
from inspection.review.gauge import score_gauge_svg
from inspection.review.types import type_label
from inspection.review.web import (
    DEFECT_TYPES,
    HERE,
    MEDIA_HEADERS,
    SECURITY_HEADERS,
    BadRequest,
    Forbidden,
    FormQuery,
    LoginRequired,
    NotFound,
    Web,
    thumbnail,
)

logger = logging.getLogger(__name__)

__all__ = ["create_app", "score_gauge_svg"]


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
    web = Web(config, store, auth)
    if config.ingest_store:
        web.conflicts = ConflictSource(config.ingest_store)
    window = web.window_s

    app = FastAPI(title=config.title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config = config
    app.state.store = store
    app.state.auth = auth
    app.state.web = web
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    render, require, redirect, part_url = web.render, web.require, web.redirect, web.part_url

    # -- errors and headers --------------------------------------------------------------------------------

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        if exc.redirect:
            from urllib.parse import urlencode

            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            if request.method != "GET":
                target = "/queue"
            return redirect("/login?" + urlencode({"next": target}))
        return JSONResponse({"detail": "login required"}, status_code=401)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "error.html", web.session_of(request), status_code=403, error=exc.message)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> Response:
        return render(request, "error.html", web.session_of(request), status_code=400, error=exc.message)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: Exception) -> Response:
        return Response("not found", status_code=404, media_type="text/plain")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if not request.url.path.startswith(("/static/", "/media/")) and "/photos/" not in request.url.path:
            response.headers.setdefault("Cache-Control", "no-store")  # pages hold live state and CSRF tokens
        return response

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
        web.set_cookie(response, LOGIN_CSRF_COOKIE, cookie, 3600)
        return response

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> Response:
        if web.session_of(request) is not None:
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
        web.set_cookie(response, SESSION_COOKIE, auth.create_session(user), int(config.session_hours * 3600))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        logger.info("login: %s", user.username)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session, _ = await web.require_post(request)
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
        f = web.filters_from(request.query_params)
        try:
            page = max(1, int(request.query_params.get("page") or 1))
        except ValueError:
            raise BadRequest(f"page: {request.query_params.get('page')!r} is not a page number") from None
        size = config.page_size
        every = parts.all_parts(store, f, window)  # one read serves the page, the count and the first waiting part
        waiting = every if f.status == "waiting" else parts.all_parts(store, parts.with_status(f, "waiting"), window)
        q = web.filter_query(f)
        return render(
            request,
            "queue.html",
            session,
            filters=f,
            q=q,
            items=every[(page - 1) * size : page * size],
            total=len(every),
            waiting=len(waiting),
            page=page,
            pages=max(1, -(-len(every) // size)),
            options=queries.filter_options(store),
            since_value=web.local_input(f.since),
            until_value=web.local_input(f.until),
            first_waiting=waiting[0].request_id if waiting else None,
            part_url=part_url,
            **({"waiting_total": len(waiting)} if not web.filter_query(parts.with_status(f, "waiting")) else {}),
        )

    @app.get("/api/queue")
    def api_queue(request: Request) -> Response:
        require(request, redirect=False)
        f = web.filters_from(request.query_params)
        every = parts.all_parts(store, f, window)

        def photo(p: parts.Photo) -> dict[str, Any]:
            return {
                "request_id": p.request_id,
                "timestamp": p.timestamp.isoformat(),
                "verdict": p.verdict,
                "defect_score": p.defect_score,
                "model_version": p.model_version,
                "decision": p.decision,
            }

        return JSONResponse(
            {
                "waiting": parts.count_waiting(store, f, window),
                "total": len(every),
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
                        "predicted_type": i.predicted_type,
                        "predicted_type_probability": i.predicted_type_probability,
                        "reviewer": i.reviewer,
                        "photos": [photo(p) for p in i.photos],
                    }
                    for i in every[: config.page_size]
                ],
            }
        )

    # -- one part ------------------------------------------------------------------------------------------

    def part_response(
        request: Request,
        session: Any,
        request_id: str,
        f: queries.QueueFilters,
        status_code: int = 200,
        **extra: Any,
    ) -> Response:
        part = parts.part_of(store, request_id, window)
        if part is None:
            return render(
                request, "error.html", session, status_code=404, error=f"No part with request id {request_id}."
            )
        q = web.filter_query(f)
        listing = parts.all_parts(store, f, window)  # one read: the neighbours and, unfiltered, the counts
        prev_id, next_id = parts.neighbours_in(listing, part)
        waiting = len(listing) if f.status == "waiting" else parts.count_waiting(store, f, window)
        trail = parts.history(store, part)
        current = next((e for e in reversed(trail) if e["is_current"]), None) if part.decision else None
        mine = {p.reviewer for p in part.photos if p.decision_id is not None}
        worst = part.worst
        others = [p.defect_score for p in part.photos if p is not worst and p.defect_score is not None]
        # the type choice shows QA's decision once there is one; until then the model's answer, pre-selected
        decided_type = current["defect_type"] if current else None
        chosen_type = decided_type if current else part.predicted_type
        return render(
            request,
            "part.html",
            session,
            status_code=status_code,
            part=part,
            worst=worst,
            current=current,
            history=trail,
            q=q,
            prev_url=part_url(prev_id, q) if prev_id else None,
            next_url=part_url(next_id, q) if next_id else None,
            prev_id=prev_id,
            next_id=next_id,
            queue_url="/queue" + (f"?{q}" if q else ""),
            waiting=waiting,
            **({"waiting_total": waiting} if not web.filter_query(parts.with_status(f, "waiting")) else {}),
            can_undo_here=bool(mine) and (mine == {session.user.username} or session.user.is_admin),
            flagged=part.verdict in queries.FLAGGED_VERDICTS,
            gauge=score_gauge_svg(worst.defect_score, worst.review_threshold, worst.reject_threshold, others),
            type_choices=web.types.for_version(part.model_version, decided_type, part.predicted_type),
            chosen_type=chosen_type or "",
            **extra,
        )

    @app.get("/parts/{request_id}", response_class=HTMLResponse)
    def part_page(request: Request, request_id: str) -> Response:
        session = require(request)
        last = request.query_params.get("last")
        last_row = store.get_row(last) if last else None  # "saved: part X" after a decision moved us on
        return part_response(request, session, request_id, web.filters_from(request.query_params), last_part=last_row)

    @app.post("/parts/{request_id}/decision")
    async def decide(request: Request, request_id: str) -> Response:
        session, form = await web.require_post(request)
        q = str(form.get("q") or "")
        f = web.filters_from(FormQuery(q))
        seen: Any = parts.ANY
        try:
            if form.get("seen"):
                seen = parts.parse_seen(str(form.get("seen")))
            elif "expected" in form:  # a one-photo form (older pages, scripts): the state of the named photo
                raw = str(form.get("expected") or "")
                part = parts.part_of(store, request_id, window)
                if part is not None and len(part.photos) == 1:
                    seen = {request_id: int(raw) if raw else None}
        except ValueError:
            raise BadRequest(f"expected: {form.get('expected')!r} is not a decision id") from None
        except queries.ReviewError as exc:
            raise BadRequest(str(exc)) from None
        kind = str(form.get("defect_type") or "") or None
        card_types: tuple[str, ...] = ()
        if kind and web.types.registry is not None:  # the part's model may name types the store has not seen yet
            # the model the page offered the types of: the part's (its worst photo's), not the named photo's
            shown = parts.part_of(store, request_id, window)
            card_types = web.types.card_types(shown.model_version if shown else None)
        try:
            parts.record_part_decision(
                store,
                request_id,
                str(form.get("action") or ""),
                session.user.username,
                defect_type=kind,
                comment=str(form.get("comment") or ""),
                seen=seen,
                window_s=window,
                extra_types=card_types,
            )
        except parts.PartConflict as exc:
            return part_response(request, session, request_id, f, status_code=409, error=str(exc))
        except queries.ReviewError as exc:
            raise BadRequest(str(exc)) from None
        nxt = parts.next_waiting(store, request_id, f, window)
        if nxt is None:
            return redirect("/queue" + (f"?{q}&" if q else "?") + "msg=queue_empty")
        return redirect(part_url(nxt, q, msg="decided", last=request_id))

    @app.post("/undo")
    async def undo(request: Request) -> Response:
        session, form = await web.require_post(request)
        q = str(form.get("q") or "")
        target = str(form.get("request_id") or "") or None
        try:
            undone = parts.undo_part_decision(
                store, session.user.username, request_id=target, may_undo_others=session.user.is_admin, window_s=window
            )
        except queries.ReviewError as exc:
            raise Forbidden(str(exc)) from None
        if undone is None:
            back = part_url(target, q, msg="nothing_to_undo") if target else "/queue?msg=nothing_to_undo"
            return redirect(back)
        part = parts.part_of(store, undone, window)
        return redirect(part_url(part.request_id if part else undone, q, msg="undone"))

    # -- media ---------------------------------------------------------------------------------------------

    @app.get("/media/{request_id}/image")
    def media_image(request: Request, request_id: str) -> Response:
        require(request, redirect=False)
        return FileResponse(web.media_file(request_id, "image_path"), headers=MEDIA_HEADERS)

    @app.get("/media/{request_id}/heatmap")
    def media_heatmap(request: Request, request_id: str) -> Response:
        require(request, redirect=False)
        web.media_file(request_id, "heatmap_path")  # 404 unless the row names a map inside the media folder
        try:
            data = store.overlay_png(request_id)  # rendered here, not on the line: QA opens few parts
        except DecisionStoreError:
            logger.exception("heatmap of %s cannot be rendered", request_id)
            data = None
        if data is None:
            raise NotFound()
        return Response(data, media_type="image/png", headers=MEDIA_HEADERS)

    @app.get("/media/{request_id}/thumb")
    def media_thumb(request: Request, request_id: str) -> Response:
        require(request, redirect=False)
        data = thumbnail(str(web.media_file(request_id, "image_path")))
        if data is None:
            raise NotFound()
        return Response(data, media_type="image/jpeg", headers=MEDIA_HEADERS)

    # -- statistics ----------------------------------------------------------------------------------------

    def stats_for(request: Request) -> stats.ReviewStats:
        params = request.query_params
        until = web.parse_time(params.get("until"), "until") or datetime.now(UTC)
        try:
            hours = float(params.get("hours") or config.stats_default_hours)
        except ValueError:
            raise BadRequest(f"hours: {params.get('hours')!r} is not a number of hours") from None
        if not 0 < hours <= 24 * 366:
            raise BadRequest(f"hours: {hours} is out of range (0 < hours <= 8784)")
        since = web.parse_time(params.get("since"), "since") or until - timedelta(hours=hours)
        if since >= until:
            raise BadRequest("since must be before until")
        return stats.compute_stats(store, since, until, station=params.get("station") or None)

    @app.get("/stats", response_class=HTMLResponse)
    def stats_page(request: Request) -> Response:
        session = require(request)
        s = stats_for(request)
        types = [(label, float(s.defects_by_type.get(value, 0))) for value, label in DEFECT_TYPES]
        enum = {value for value, _ in DEFECT_TYPES} | {stats.UNSPECIFIED}
        # a plant's own type names (a typed model's, confirmed by QA) after QA's enum
        types += [(type_label(t), float(n)) for t, n in sorted(s.defects_by_type.items()) if t not in enum]
        types.append((stats.UNSPECIFIED, float(s.defects_by_type.get(stats.UNSPECIFIED, 0))))
        predicted = [(type_label(t), float(n)) for t, n in s.predicted_by_type.items()]
        versions = [(v.model_version, 100.0 * (v.override_rate or 0.0)) for v in s.per_version if v.decided]
        rows, cols = s.confusion_axes()
        return render(
            request,
            "stats.html",
            session,
            s=s,
            flagged_svg=stats.flagged_chart_svg(s),
            types_svg=stats.hbar_chart_svg(types),
            predicted_svg=stats.hbar_chart_svg(predicted) if predicted else None,
            confusion_rows=rows,
            confusion_cols=cols,
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

    add_admin_routes(app, web)
    add_conflict_routes(app, web)
    return app
