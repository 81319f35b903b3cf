"""The admins' page of the review app: add users, disable / enable them, change their role."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from inspection.review.auth import AuthError
from inspection.review.web import Web

logger = logging.getLogger(__name__)


def add_admin_routes(app: FastAPI, web: Web) -> None:
    auth = web.auth

    def users_page_with_error(request: Request, session, error: str) -> Response:
        return web.render(
            request,
            "users.html",
            session,
            status_code=400,
            users=auth.list_users(),
            min_len=web.config.min_password_length,
            error=error,
        )

    @app.get("/admin/users", response_class=HTMLResponse)
    def users_page(request: Request) -> Response:
        session = web.require(request, admin=True)
        return web.render(
            request, "users.html", session, users=auth.list_users(), min_len=web.config.min_password_length
        )

    @app.post("/admin/users")
    async def users_add(request: Request) -> Response:
        session, form = await web.require_post(request, admin=True)
        try:
            auth.add_user(
                str(form.get("username") or "").strip(),
                str(form.get("password") or ""),
                str(form.get("role") or ""),
                created_by=session.user.username,
            )
        except AuthError as exc:
            return users_page_with_error(request, session, str(exc))
        return web.redirect("/admin/users?msg=user_added")

    @app.post("/admin/users/{username}")
    async def users_change(request: Request, username: str) -> Response:
        session, form = await web.require_post(request, admin=True)
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
            return users_page_with_error(request, session, str(exc))
        logger.info("admin %s: %s %s", session.user.username, change, username)
        return web.redirect("/admin/users?msg=user_changed")
