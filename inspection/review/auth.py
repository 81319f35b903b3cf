"""Users, passwords, sessions and CSRF tokens of the review app, kept in the decision store's own database.

- Passwords are hashed with argon2id (argon2-cffi); the hash carries its parameters, so raising the cost later
  rehashes on the next successful login.
- Sessions are server-side rows (`review_sessions`): the cookie holds a random session id signed with
  itsdangerous; logging out, disabling a user or changing a password revokes the rows, so a copied cookie stops
  working at once instead of living until it expires. The database keeps only the sha256 of the id.
- Each session has its own CSRF token, required on every POST (form field `csrf_token` or header
  `X-CSRF-Token`). The login form, which has no session yet, uses a signed double-submit cookie instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import Boolean, Column, DateTime, Engine, Integer, MetaData, String, Table, Text, insert, select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from inspection.errors import InspectionError
from inspection.review.config import ROLES

logger = logging.getLogger(__name__)

auth_metadata = MetaData()

users = Table(
    "review_users",
    auth_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("role", String(16), nullable=False),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(64), nullable=True),  # None when created from the CLI
    Column("last_login_at", DateTime(timezone=True), nullable=True),
)

sessions = Table(
    "review_sessions",
    auth_metadata,
    Column("id_hash", String(64), primary_key=True),  # sha256 of the session id: a leaked table opens nothing
    Column("username", String(64), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

# Small key/value table: the cookie-signing secret lives here so that every app process shares it.
settings = Table(
    "review_settings",
    auth_metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,63}$")
SESSION_COOKIE = "review_session"
LOGIN_CSRF_COOKIE = "review_login_csrf"


class AuthError(InspectionError):
    """A user or password cannot be accepted (bad name, weak password, unknown user, ...)."""


@dataclass(frozen=True)
class User:
    username: str
    role: str
    active: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Session:
    user: User
    csrf_token: str
    expires_at: datetime


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _hash_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def tokens_equal(a: str | None, b: str | None) -> bool:
    """Constant-time comparison that treats a missing token as a mismatch."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode(), b.encode())


class Auth:
    """Users and sessions on one SQLAlchemy engine (the decision store's)."""

    def __init__(
        self,
        engine: Engine,
        session_hours: float = 12.0,
        min_password_length: int = 10,
        max_login_failures: int = 5,
        login_lockout_s: float = 300.0,
        password_time_cost: int = 3,
        password_memory_kib: int = 65536,
    ):
        self.engine = engine
        self.session_ttl = timedelta(hours=session_hours)
        self.min_password_length = min_password_length
        self.max_login_failures = max_login_failures
        self.login_lockout_s = login_lockout_s
        self.hasher = PasswordHasher(time_cost=password_time_cost, memory_cost=password_memory_kib)
        auth_metadata.create_all(engine)
        self._failures: dict[str, list[float]] = {}
        self._failures_lock = threading.Lock()
        self.serializer = URLSafeTimedSerializer(self._secret(), salt="inspection-review")
        self._dummy: str | None = None

    @property
    def _dummy_hash(self) -> str:
        # A hash to verify against when the user does not exist, so timing does not reveal valid names.
        if self._dummy is None:
            self._dummy = self.hasher.hash(secrets.token_hex(16))
        return self._dummy

    # -- secret --------------------------------------------------------------------------------------------

    def _secret(self) -> str:
        query = select(settings.c.value).where(settings.c.key == "session_secret")
        with self.engine.connect() as conn:
            value = conn.execute(query).scalar()
        if value:
            return value
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(settings), {"key": "session_secret", "value": secrets.token_urlsafe(48)})
        except SAIntegrityError:
            logger.debug("another process created the session secret first: using theirs")
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    # -- users ---------------------------------------------------------------------------------------------

    def check_password_strength(self, username: str, password: str) -> None:
        if len(password) < self.min_password_length:
            raise AuthError(f"password too short: {len(password)} characters, at least {self.min_password_length}")
        if password.lower() == username.lower():
            raise AuthError("password must not be the user name")

    def add_user(self, username: str, password: str, role: str, created_by: str | None = None) -> User:
        if not USERNAME_RE.match(username or ""):
            raise AuthError(
                f"user name {username!r} is not allowed: 2-64 characters, letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if role not in ROLES:
            raise AuthError(f"role {role!r} is not allowed; allowed: {', '.join(ROLES)}")
        self.check_password_strength(username, password)
        row = {
            "username": username,
            "password_hash": self.hasher.hash(password),
            "role": role,
            "active": True,
            "created_at": datetime.now(UTC),
            "created_by": created_by,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(users), row)
        except SAIntegrityError:
            raise AuthError(f"user {username!r} already exists") from None
        logger.info("user %s added with role %s (by %s)", username, role, created_by or "cli")
        return User(username, role, True)

    def get_user(self, username: str) -> User | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.username == username)).mappings().first()
        return None if row is None else User(row["username"], row["role"], bool(row["active"]))

    def list_users(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(users).order_by(users.c.username)).mappings().all()
        return [
            {
                "username": r["username"],
                "role": r["role"],
                "active": bool(r["active"]),
                "created_at": _utc(r["created_at"]),
                "created_by": r["created_by"],
                "last_login_at": _utc(r["last_login_at"]),
            }
            for r in rows
        ]

    def _require_user(self, username: str) -> None:
        if self.get_user(username) is None:
            raise AuthError(f"no user named {username!r}")

    def set_active(self, username: str, active: bool) -> None:
        self._require_user(username)
        with self.engine.begin() as conn:
            conn.execute(update(users).where(users.c.username == username).values(active=active))
        if not active:
            self.revoke_sessions(username)
        logger.info("user %s %s", username, "enabled" if active else "disabled")

    def set_role(self, username: str, role: str) -> None:
        if role not in ROLES:
            raise AuthError(f"role {role!r} is not allowed; allowed: {', '.join(ROLES)}")
        self._require_user(username)
        with self.engine.begin() as conn:
            conn.execute(update(users).where(users.c.username == username).values(role=role))
        logger.info("user %s now has role %s", username, role)

    def set_password(self, username: str, password: str) -> None:
        self._require_user(username)
        self.check_password_strength(username, password)
        with self.engine.begin() as conn:
            conn.execute(
                update(users).where(users.c.username == username).values(password_hash=self.hasher.hash(password))
            )
        self.revoke_sessions(username)
        logger.info("password of %s changed; its sessions were ended", username)

    # -- login ---------------------------------------------------------------------------------------------

    def locked_out(self, username: str) -> bool:
        now = time.monotonic()
        with self._failures_lock:
            recent = [t for t in self._failures.get(username, []) if now - t < self.login_lockout_s]
            self._failures[username] = recent
            return len(recent) >= self.max_login_failures

    def _note_failure(self, username: str) -> None:
        with self._failures_lock:
            self._failures.setdefault(username, []).append(time.monotonic())

    def authenticate(self, username: str, password: str) -> User | None:
        """The user if the password matches and the account is active and not locked out, else None."""
        if self.locked_out(username):
            logger.warning("login refused for %r: too many failures", username)
            return None
        with self.engine.connect() as conn:
            row = conn.execute(select(users).where(users.c.username == username)).mappings().first()
        stored = row["password_hash"] if row is not None else self._dummy_hash
        try:
            self.hasher.verify(stored, password)
            ok = row is not None and bool(row["active"])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok:
            self._note_failure(username)
            logger.info("failed login for %r", username)
            return None
        assert row is not None
        values: dict[str, Any] = {"last_login_at": datetime.now(UTC)}
        if self.hasher.check_needs_rehash(stored):
            values["password_hash"] = self.hasher.hash(password)
        with self.engine.begin() as conn:
            conn.execute(update(users).where(users.c.username == username).values(**values))
        with self._failures_lock:
            self._failures.pop(username, None)
        return User(row["username"], row["role"], True)

    # -- sessions ------------------------------------------------------------------------------------------

    def create_session(self, user: User) -> str:
        """A new session for `user`; returns the signed cookie value."""
        session_id = secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(
                insert(sessions),
                {
                    "id_hash": _hash_id(session_id),
                    "username": user.username,
                    "csrf_token": secrets.token_urlsafe(32),
                    "created_at": now,
                    "expires_at": now + self.session_ttl,
                },
            )
        return self.serializer.dumps(session_id)

    def session_from_cookie(self, cookie: str | None) -> Session | None:
        """The live session behind a cookie value, or None (bad signature, expired, revoked, user disabled)."""
        if not cookie:
            return None
        try:
            session_id = self.serializer.loads(cookie, max_age=int(self.session_ttl.total_seconds()))
        except BadSignature:
            return None
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(sessions, users.c.role, users.c.active)
                    .join(users, users.c.username == sessions.c.username)
                    .where(sessions.c.id_hash == _hash_id(str(session_id)))
                )
                .mappings()
                .first()
            )
        if row is None or row["revoked_at"] is not None or not row["active"]:
            return None
        expires = _utc(row["expires_at"])
        assert expires is not None
        if expires <= datetime.now(UTC):
            return None
        return Session(User(row["username"], row["role"], True), row["csrf_token"], expires)

    def end_session(self, cookie: str | None) -> None:
        if not cookie:
            return
        try:
            session_id = self.serializer.loads(cookie)
        except BadSignature:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(sessions)
                .where(sessions.c.id_hash == _hash_id(str(session_id)), sessions.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )

    def revoke_sessions(self, username: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(sessions)
                .where(sessions.c.username == username, sessions.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )

    # -- login-form CSRF (double submit: signed cookie == form field) ---------------------------------------

    def new_login_csrf(self) -> tuple[str, str]:
        """(token for the form, signed value for the cookie)."""
        token = secrets.token_urlsafe(24)
        return token, self.serializer.dumps(token, salt="login-csrf")

    def check_login_csrf(self, cookie: str | None, form_token: str | None) -> bool:
        if not cookie:
            return False
        try:
            token = self.serializer.loads(cookie, salt="login-csrf", max_age=3600)
        except BadSignature:
            return False
        return tokens_equal(str(token), form_token)
