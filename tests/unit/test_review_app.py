"""The review web app through TestClient: pages, decisions, undo, stats, admin, and the security rules."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from inspection.decisions import DecisionStore, inspections, reviews
from inspection.ingest import IngestConfig, run_ingest
from inspection.review import ReviewConfig, create_app
from inspection.review import queries as q
from inspection.review.auth import SESSION_COOKIE
from inspection.review.demo import seed_store, write_mixed_label_folder

PASSWORD = "correct horse battery"
NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)


@pytest.fixture
def env(tmp_path: Path):
    store = DecisionStore(tmp_path / "store")
    parts = [p for p in seed_store(store, n=5, n_pass=2, seed=2, now=NOW) if p.verdict != "pass"]
    # an ingest store with one part labelled both ways, so the conflict routes have something to guard
    write_mixed_label_folder(tmp_path / "drop", n_parts=3, copies=2)
    run_ingest(IngestConfig(progress=False, workers=1), [tmp_path / "drop"], tmp_path / "ingest")
    # a cheap argon2 profile keeps the tests quick; the production profile is tested in test_review_auth.py
    config = ReviewConfig(
        store=str(tmp_path / "store"),
        max_login_failures=3,
        password_time_cost=1,
        password_memory_kib=1024,
        ingest_store=str(tmp_path / "ingest"),
    )
    app = create_app(config, store=store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    app.state.auth.add_user("adam", PASSWORD, "admin")
    yield app, store, [p.request_id for p in parts]
    store.close()


def _conflict(app) -> tuple[str, str]:
    """(group id, sha256 of one of its photos) of the env's label conflict."""
    conflict = app.state.web.conflicts.all()[0]
    return conflict.group_id, conflict.photos[0][0]


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def login(app, username: str = "rita", password: str = PASSWORD) -> tuple[TestClient, str]:
    client = TestClient(app)
    token = _csrf(client.get("/login").text)
    r = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}, follow_redirects=False
    )
    assert r.status_code == 303, r.text
    return client, _csrf(client.get("/queue").text)


def n_reviews(store: DecisionStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(reviews)).scalar_one()


# -- pages and actions -------------------------------------------------------------------------------------


def test_queue_page_lists_waiting_parts_with_count_and_filters(env) -> None:
    app, store, ids = env
    client, _ = login(app)
    r = client.get("/queue")
    assert r.status_code == 200
    assert re.search(r'data-testid="waiting-count">5<', r.text)
    assert [m for m in re.findall(r'data-href="/parts/([0-9a-f]+)', r.text)] == ids  # oldest first
    rejects = [rid for rid in ids if store.get_row(rid)["verdict"] == "reject"]
    r = client.get("/queue?verdict=reject")
    assert re.findall(r'data-href="/parts/([0-9a-f]+)', r.text) == rejects
    assert f'data-testid="waiting-count">{len(rejects)}<' in r.text
    assert "verdict=reject" in r.text  # the filter travels to the part links
    r = client.get("/api/queue?station=line-2")
    body = r.json()
    assert body["waiting"] == len(body["items"]) == sum(store.get_row(i)["station"] == "line-2" for i in ids)
    assert client.get("/queue?verdict=pass").status_code == 400
    assert client.get("/queue?since=yesterday").status_code == 400


def test_part_page_shows_image_heatmap_score_thresholds_and_prefetches_neighbours(env) -> None:
    app, store, ids = env
    client, _ = login(app)
    row = store.get_row(ids[1])
    html = client.get(f"/parts/{ids[1]}").text
    assert f'src="/media/{ids[1]}/image"' in html and f'src="/media/{ids[1]}/heatmap"' in html
    assert f"{row['defect_score']:.3f}" in html
    assert "review 0.30" in html and "reject 0.70" in html
    for text in (row["station"], row["model_version"], row["part_id"], row["timestamp"].strftime("%Y-%m-%d %H:%M")):
        assert text in html
    for neighbour in (ids[0], ids[2]):
        assert f'<link rel="prefetch" href="/parts/{neighbour}">' in html
        assert f'<link rel="prefetch" href="/media/{neighbour}/image" as="image">' in html
    for key in ("d", "o", "h", "u", "j", "k", "1", "5", "c"):
        assert f'data-key="{key}"' in html
    img = client.get(f"/media/{ids[1]}/image")
    assert img.status_code == 200 and img.content == (store.media_dir / row["image_path"]).read_bytes()
    assert client.get(f"/media/{ids[1]}/heatmap").headers["content-type"] == "image/png"
    assert client.get(f"/media/{ids[1]}/thumb").content[:3] == b"\xff\xd8\xff"
    assert client.get("/parts/unknown").status_code == 404


def test_decide_moves_on_and_is_in_the_audit_trail(env) -> None:
    app, store, ids = env
    client, token = login(app)
    r = client.post(
        f"/parts/{ids[0]}/decision",
        data={
            "csrf_token": token,
            "action": "confirm_defect",
            "defect_type": "blowhole",
            "comment": "two pores",
            "expected": "",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"].startswith(f"/parts/{ids[1]}?")
    assert q.count_waiting(store) == 4
    html = client.get(r.headers["location"]).text
    assert "Decision saved." in html
    html = client.get(f"/parts/{ids[0]}").text
    assert "Confirmed defect" in html and "blowhole" in html and "two pores" in html and ">rita<" in html
    # a second decision on the same part from a stale page is refused, nothing is written
    r = client.post(
        f"/parts/{ids[0]}/decision",
        data={"csrf_token": token, "action": "override_ok", "expected": ""},
        follow_redirects=False,
    )
    assert r.status_code == 409 and "changed meanwhile" in r.text
    assert n_reviews(store) == 1
    # bad input: clear 400, nothing written
    r = client.post(f"/parts/{ids[1]}/decision", data={"csrf_token": token, "action": "maybe", "expected": ""})
    assert r.status_code == 400 and "allowed: confirm_defect, override_ok" in r.text
    assert n_reviews(store) == 1


def test_undo_appends_and_returns_to_the_part(env) -> None:
    app, store, ids = env
    client, token = login(app)
    client.post(f"/parts/{ids[0]}/decision", data={"csrf_token": token, "action": "override_ok", "expected": ""})
    r = client.post("/undo", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith(f"/parts/{ids[0]}")
    assert q.count_waiting(store) == 5 and n_reviews(store) == 2
    html = client.get(f"/parts/{ids[0]}").text
    assert "Waiting for a decision" in html and "undone" in html
    r = client.post("/undo", data={"csrf_token": token}, follow_redirects=False)
    assert "nothing_to_undo" in r.headers["location"]


def test_last_decision_clears_the_queue(env) -> None:
    app, store, ids = env
    client, token = login(app)
    for rid in ids:
        r = client.post(
            f"/parts/{rid}/decision",
            data={"csrf_token": token, "action": "override_ok", "expected": ""},
            follow_redirects=False,
        )
    assert r.headers["location"].startswith("/queue") and "queue_empty" in r.headers["location"]
    assert "Every flagged part" in client.get("/queue").text
    assert len(q.queue(store, q.QueueFilters(status="all"))) == 5


def test_stats_page_and_api(env) -> None:
    app, store, ids = env
    client, token = login(app)
    client.post(f"/parts/{ids[0]}/decision", data={"csrf_token": token, "action": "override_ok", "expected": ""})
    client.post(
        f"/parts/{ids[1]}/decision",
        data={"csrf_token": token, "action": "confirm_defect", "defect_type": "shrinkage", "expected": ""},
    )
    params = "since=2024-05-06T00:00&until=2024-05-06T13:00"
    html = client.get(f"/stats?{params}").text
    assert html.count('<svg class="chart"') == 3
    assert 'data-testid="override-rate">50.0 %' in html
    body = client.get(f"/api/stats?{params}").json()
    assert (body["flagged"], body["decided"], body["overridden"], body["inspected"]) == (5, 2, 1, 7)
    assert body["defects_by_type"]["shrinkage"] == 1
    assert client.get("/stats?hours=-1").status_code == 400


def test_admin_adds_and_disables_users_from_the_page(env) -> None:
    app, _, _ = env
    admin, token = login(app, "adam")
    assert "rita" in admin.get("/admin/users").text
    r = admin.post(
        "/admin/users", data={"csrf_token": token, "username": "nora", "password": "short", "role": "reviewer"}
    )
    assert r.status_code == 400 and "at least 10" in r.text
    r = admin.post(
        "/admin/users",
        data={"csrf_token": token, "username": "nora", "password": PASSWORD * 2, "role": "reviewer"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    nora, _ = login(app, "nora", PASSWORD * 2)
    assert nora.get("/queue").status_code == 200
    admin.post("/admin/users/nora", data={"csrf_token": token, "change": "disable"})
    assert nora.get("/queue", follow_redirects=False).status_code == 303  # her live session ended at once
    r = admin.post("/admin/users/adam", data={"csrf_token": token, "change": "disable"})
    assert r.status_code == 400 and "cannot disable yourself" in r.text


# -- security ----------------------------------------------------------------------------------------------


def _route_calls(ids: list[str], conflict: tuple[str, str]) -> list[tuple[str, str]]:
    group, sha = conflict
    return [
        ("GET", "/conflicts"),
        ("GET", f"/conflicts/{group}"),
        ("GET", f"/conflicts/{group}/photos/{sha}"),
        ("POST", f"/conflicts/{group}/decision"),
        ("GET", "/"),
        ("GET", "/queue"),
        ("GET", f"/parts/{ids[0]}"),
        ("GET", "/stats"),
        ("GET", "/admin/users"),
        ("GET", "/api/queue"),
        ("GET", "/api/stats"),
        ("GET", f"/media/{ids[0]}/image"),
        ("GET", f"/media/{ids[0]}/heatmap"),
        ("GET", f"/media/{ids[0]}/thumb"),
        ("POST", f"/parts/{ids[0]}/decision"),
        ("POST", "/undo"),
        ("POST", "/logout"),
        ("POST", "/admin/users"),
        ("POST", "/admin/users/rita"),
    ]


def test_every_route_is_covered_by_the_security_tests(env) -> None:
    app, _, ids = env
    group, sha = _conflict(app)

    def pattern(path: str) -> str:
        path = path.replace(sha, "{sha256}").replace(f"/conflicts/{group}", "/conflicts/{group_id}")
        return re.sub(r"[0-9a-f]{32}", "{request_id}", path).replace("/rita", "/{username}")

    covered = {(m, pattern(p)) for m, p in _route_calls(ids, _conflict(app))}
    routes = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute) and route.path != "/login"
        for method in route.methods
    }
    assert routes <= covered, f"routes without a security test: {sorted(routes - covered)}"


def test_nothing_without_a_session(env) -> None:
    app, store, ids = env
    client = TestClient(app)
    for method, path in _route_calls(ids, _conflict(app)):
        r = client.request(
            method,
            path,
            data={
                "action": "confirm_defect",
                "username": "x",
                "password": PASSWORD * 2,
                "role": "admin",
                "change": "disable",
                "label": "ok",
            },
            follow_redirects=False,
        )
        if r.status_code == 303:
            assert r.headers["location"].startswith("/login"), (method, path)
        else:
            assert r.status_code in (401, 403), (method, path, r.status_code)
            assert "image" not in r.headers.get("content-type", "")
    assert n_reviews(store) == 0
    assert app.state.auth.get_user("x") is None and app.state.auth.get_user("rita").active
    assert len(app.state.web.conflicts.all()) == 1  # nothing was relabelled


def test_forged_or_tampered_cookie_is_no_session(env) -> None:
    app, _, _ = env
    client, _ = login(app)
    cookie = client.cookies.get(SESSION_COOKIE)
    forged = TestClient(app, cookies={SESSION_COOKIE: cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")})
    assert forged.get("/queue", follow_redirects=False).status_code == 303


def test_post_without_or_with_a_wrong_csrf_token_is_refused(env) -> None:
    app, store, ids = env
    client, token = login(app, "adam")
    other, other_token = login(app, "rita")
    assert other_token != token
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "x" * 43}, {"csrf_token": other_token}):
        for path, extra in (
            (f"/parts/{ids[0]}/decision", {"action": "confirm_defect", "expected": ""}),
            ("/undo", {}),
            ("/admin/users", {"username": "mallory", "password": PASSWORD, "role": "admin"}),
            ("/admin/users/rita", {"change": "disable"}),
            (f"/conflicts/{_conflict(app)[0]}/decision", {"label": "ok"}),
            ("/logout", {}),
        ):
            r = client.post(path, data={**data, **extra}, follow_redirects=False)
            assert r.status_code == 403, (path, data)
    assert n_reviews(store) == 0
    assert app.state.auth.get_user("mallory") is None and app.state.auth.get_user("rita").active
    assert len(app.state.web.conflicts.all()) == 1
    assert client.get("/queue").status_code == 200  # the logout without a token did not log out
    # the header form of the token (for scripts) is accepted
    r = client.post("/undo", headers={"X-CSRF-Token": token}, follow_redirects=False)
    assert r.status_code == 303


def test_login_form_needs_its_csrf_cookie(env) -> None:
    app, _, _ = env
    client = TestClient(app)
    r = client.post("/login", data={"username": "rita", "password": PASSWORD, "csrf_token": "guess"})
    assert r.status_code == 403 and SESSION_COOKIE not in client.cookies


def test_reviewer_cannot_reach_admin_actions(env) -> None:
    app, _, _ = env
    client, token = login(app, "rita")
    assert client.get("/admin/users").status_code == 403
    r = client.post(
        "/admin/users", data={"csrf_token": token, "username": "eve", "password": PASSWORD, "role": "admin"}
    )
    assert r.status_code == 403
    r = client.post("/admin/users/rita", data={"csrf_token": token, "change": "role", "role": "admin"})
    assert r.status_code == 403
    assert app.state.auth.get_user("eve") is None and app.state.auth.get_user("rita").role == "reviewer"
    assert 'href="/admin/users"' not in client.get("/queue").text


def test_reviewer_cannot_undo_someone_elses_decision(env) -> None:
    app, store, ids = env
    admin, admin_token = login(app, "adam")
    admin.post(f"/parts/{ids[0]}/decision", data={"csrf_token": admin_token, "action": "override_ok", "expected": ""})
    client, token = login(app, "rita")
    r = client.post("/undo", data={"csrf_token": token, "request_id": ids[0]})
    assert r.status_code == 403 and "only they or an admin" in r.text
    assert q.count_waiting(store) == 4


def test_html_in_a_comment_is_escaped(env) -> None:
    app, _, ids = env
    client, token = login(app)
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    client.post(
        f"/parts/{ids[0]}/decision",
        data={"csrf_token": token, "action": "confirm_defect", "comment": evil, "expected": ""},
    )
    html = client.get(f"/parts/{ids[0]}").text
    assert evil not in html and "<script>alert" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html


def test_cookies_headers_logout_and_redirects(env) -> None:
    app, _, _ = env
    client = TestClient(app)
    token = _csrf(client.get("/login").text)
    r = client.post(
        "/login",
        data={"username": "rita", "password": PASSWORD, "csrf_token": token, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert r.headers["location"] == "/queue"  # no open redirect
    set_cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE)][0]
    assert "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie
    page = client.get("/queue")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    stolen = client.cookies.get(SESSION_COOKIE)
    r = client.post("/logout", data={"csrf_token": _csrf(page.text)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    replay = TestClient(app, cookies={SESSION_COOKIE: stolen})
    assert replay.get("/queue", follow_redirects=False).status_code == 303  # the session was ended server-side


def test_wrong_password_and_lockout(env) -> None:
    app, _, _ = env
    client = TestClient(app)
    for _ in range(3):
        token = _csrf(client.get("/login").text)
        r = client.post("/login", data={"username": "rita", "password": "wrong password!", "csrf_token": token})
        assert r.status_code == 401 and "Wrong user name or password" in r.text or "Too many" in r.text
    token = _csrf(client.get("/login").text)
    r = client.post("/login", data={"username": "rita", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 401 and "Too many failed logins" in r.text  # even the right password, for a while


def test_media_path_outside_the_store_is_never_served(env, tmp_path: Path) -> None:
    app, store, ids = env
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    with store.engine.begin() as conn:
        conn.execute(update(inspections).where(inspections.c.request_id == ids[0]).values(image_path="../secret.txt"))
    client, _ = login(app)
    r = client.get(f"/media/{ids[0]}/image")
    assert r.status_code == 404 and "not for you" not in r.text
