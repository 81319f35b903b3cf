"""Review users and sessions: argon2 hashes, server-side sessions that can be ended, login CSRF, lockout."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from inspection.decisions import DecisionStore
from inspection.errors import ConfigError
from inspection.review.auth import Auth, AuthError, sessions, users
from inspection.review.config import ReviewConfig

PASSWORD = "correct horse battery"
CHEAP = {"password_time_cost": 1, "password_memory_kib": 1024}


@pytest.fixture
def engine(tmp_path: Path):
    store = DecisionStore(tmp_path / "store")
    yield store.engine
    store.close()


def _hash_of(engine, name: str) -> str:
    with engine.connect() as conn:
        return conn.execute(select(users.c.password_hash).where(users.c.username == name)).scalar_one()


def test_passwords_are_stored_as_argon2id_with_the_production_profile(engine) -> None:
    auth = Auth(engine)  # defaults = ReviewConfig defaults
    auth.add_user("rita", PASSWORD, "reviewer")
    stored = _hash_of(engine, "rita")
    assert stored.startswith("$argon2id$") and "m=65536,t=3" in stored
    assert PASSWORD not in stored
    assert auth.authenticate("rita", PASSWORD) is not None
    assert auth.authenticate("rita", PASSWORD + "x") is None
    assert ReviewConfig().password_memory_kib == 65536 and ReviewConfig().password_time_cost == 3


def test_old_hashes_are_upgraded_at_login(engine) -> None:
    Auth(engine, **CHEAP).add_user("rita", PASSWORD, "reviewer")
    assert "m=1024,t=1" in _hash_of(engine, "rita")
    strong = Auth(engine, password_time_cost=2, password_memory_kib=4096)
    assert strong.authenticate("rita", PASSWORD) is not None
    assert "m=4096,t=2" in _hash_of(engine, "rita")


def test_user_rules(engine) -> None:
    auth = Auth(engine, **CHEAP)
    auth.add_user("rita", PASSWORD, "reviewer")
    with pytest.raises(AuthError, match="already exists"):
        auth.add_user("rita", PASSWORD, "admin")
    with pytest.raises(AuthError, match="allowed: reviewer, admin"):
        auth.add_user("otto", PASSWORD, "root")
    with pytest.raises(AuthError, match="at least 10"):
        auth.add_user("otto", "short", "reviewer")
    with pytest.raises(AuthError, match="not be the user name"):
        auth.add_user("otto-the-great", "OTTO-THE-GREAT", "reviewer")
    with pytest.raises(AuthError, match="not allowed"):
        auth.add_user("<b>x</b>", PASSWORD, "reviewer")
    with pytest.raises(AuthError, match="no user named"):
        auth.set_active("ghost", False)
    assert [u["username"] for u in auth.list_users()] == ["rita"]


def test_sessions_end_on_logout_disable_password_change_and_expiry(engine) -> None:
    auth = Auth(engine, **CHEAP)
    rita = auth.add_user("rita", PASSWORD, "reviewer")
    cookie = auth.create_session(rita)
    session = auth.session_from_cookie(cookie)
    assert session is not None and session.user.username == "rita" and len(session.csrf_token) >= 32
    with engine.connect() as conn:
        stored = conn.execute(select(sessions.c.id_hash)).scalars().all()
    assert stored and all(cookie not in h for h in stored)  # only a hash of the id is stored

    auth.end_session(cookie)
    assert auth.session_from_cookie(cookie) is None

    cookie = auth.create_session(rita)
    auth.set_active("rita", False)
    assert auth.session_from_cookie(cookie) is None
    assert auth.authenticate("rita", PASSWORD) is None  # disabled users cannot log in
    auth.set_active("rita", True)

    cookie = auth.create_session(rita)
    auth.set_password("rita", "another long passphrase")
    assert auth.session_from_cookie(cookie) is None
    assert auth.authenticate("rita", "another long passphrase") is not None

    cookie = auth.create_session(rita)
    with engine.begin() as conn:
        conn.execute(update(sessions).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert auth.session_from_cookie(cookie) is None
    assert auth.session_from_cookie("not-a-signed-value") is None
    assert auth.session_from_cookie(None) is None


def test_secret_is_shared_by_every_process_on_the_database(engine) -> None:
    first = Auth(engine, **CHEAP)
    rita = first.add_user("rita", PASSWORD, "reviewer")
    cookie = first.create_session(rita)
    second = Auth(engine, **CHEAP)  # another worker on the same store
    assert second.session_from_cookie(cookie) is not None


def test_login_csrf_and_lockout(engine) -> None:
    auth = Auth(engine, max_login_failures=2, login_lockout_s=60, **CHEAP)
    auth.add_user("rita", PASSWORD, "reviewer")
    token, cookie = auth.new_login_csrf()
    assert auth.check_login_csrf(cookie, token)
    assert not auth.check_login_csrf(cookie, token + "x")
    assert not auth.check_login_csrf(None, token)
    assert not auth.check_login_csrf(token, token)  # an unsigned cookie is worthless
    assert auth.authenticate("rita", "wrong one!!") is None
    assert auth.authenticate("rita", "wrong two!!") is None
    assert auth.locked_out("rita")
    assert auth.authenticate("rita", PASSWORD) is None
    assert auth.authenticate("nobody", PASSWORD) is None


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="IANA"):
        ReviewConfig(display_timezone="Mars/Olympus").validate()
    with pytest.raises(ConfigError, match="min_password_length"):
        ReviewConfig(min_password_length=4).validate()
    with pytest.raises(ConfigError, match="password_memory_kib"):
        ReviewConfig(password_memory_kib=16).validate()
    ReviewConfig(display_timezone="Europe/Berlin").validate()
