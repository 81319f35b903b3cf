"""OPC UA security of the runner: its own server certificate, its users, and (optionally) pinned client certificates.

- Certificate: made on first start (RSA 2048, self-signed, SHA-256: what Basic256Sha256 needs) into the cert
  folder kept with the decision store; the private key is written 0600 in a 0700 folder and never leaves it. It is
  made again only when it cannot serve: expired, or the application URI changed (clients must trust it again).
- Users: a users file of `name:argon2-hash` lines (`inspection runner opcua-user NAME` writes one), plus one user
  from INSPECTION_OPCUA_USER / INSPECTION_OPCUA_PASSWORD. Passwords are verified with argon2id; an unknown name
  costs the same verify as a wrong password, so a client cannot probe which names exist.
- Anonymous sessions are refused unless the runner runs `--opcua-insecure` (lab only).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import uacrypto
from asyncua.crypto.cert_gen import dump_private_key_as_pem, generate_private_key, generate_self_signed_app_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from inspection.errors import ConfigError
from inspection.runner.config import OPCUA_PASSWORD_ENV, OPCUA_USER_ENV

logger = logging.getLogger(__name__)

CERT_FILE = "server_cert.der"  # DER: what OPC UA clients import into their trust lists
KEY_FILE = "server_key.pem"
USER_RE = re.compile(r"^[\w.\-@]{1,64}$")
RENEW_BEFORE = dt.timedelta(days=7)  # a certificate this close to expiry is made anew at start


# -- server certificate ---------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret: created 0600 (never briefly world-readable), replaced atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # O_CREAT does not change the mode of a stale temp file
    os.replace(tmp, path)


def _san_entries(application_uri: str, hostnames: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    seen = set()
    for name in (socket.gethostname(), "localhost", "127.0.0.1", *hostnames):
        if not name or name in seen or name in ("0.0.0.0", "::"):
            continue
        seen.add(name)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _needs_new_certificate(cert: x509.Certificate, key: Any, application_uri: str) -> str | None:
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc - RENEW_BEFORE < now:
        return f"it expires {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if application_uri not in uris:
        return f"it names {uris}, not the application URI {application_uri}"
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        return "it does not belong to the private key"
    return None


def ensure_server_certificate(
    cert_dir: Path, application_uri: str, hostnames: tuple[str, ...] = (), days: int = 1825
) -> tuple[Path, Path]:
    """(certificate, private key) paths in `cert_dir`, making them on first use (see the module docstring)."""
    cert_dir = Path(cert_dir)
    cert_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(cert_dir, 0o700)
    cert_path, key_path = cert_dir / CERT_FILE, cert_dir / KEY_FILE
    if key_path.is_file():
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            logger.warning("OPC UA private key %s was readable by others (mode %o): set to 0600", key_path, mode)
            os.chmod(key_path, 0o600)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        key = generate_private_key()
        _write_private(key_path, dump_private_key_as_pem(key))
        logger.info("OPC UA: made a new private key %s (mode 0600)", key_path)
    why = "there is none"
    if cert_path.is_file():
        cert = x509.load_der_x509_certificate(cert_path.read_bytes())
        why = _needs_new_certificate(cert, key, application_uri)
    if why is not None:
        cert = generate_self_signed_app_certificate(
            key,
            "inspection runner",
            {"organizationName": "inspection"},
            _san_entries(application_uri, hostnames),
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            days=days,
        )
        tmp = cert_path.with_name(f".{cert_path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        os.replace(tmp, cert_path)
        logger.warning(
            "OPC UA: made a new self-signed server certificate %s (%s), SHA-256 %s: clients must trust it",
            cert_path,
            why,
            certificate_fingerprint(cert_path),
        )
    return cert_path, key_path


def certificate_fingerprint(path: Path) -> str:
    """SHA-256 of a DER certificate, as clients show it (colon-separated hex)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# -- users ------------------------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise ConfigError("an OPC UA password needs at least 8 characters")
    return PasswordHasher().hash(password)


def load_users(users_file: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """name -> argon2 hash, from the users file and the environment (the env user wins over a file line)."""
    environ = os.environ if environ is None else environ
    users: dict[str, str] = {}
    if users_file is not None:
        path = Path(users_file)
        if not path.is_file():
            raise ConfigError(f"opcua.users_file {path} does not exist (inspection runner opcua-user NAME creates it)")
        if stat.S_IMODE(path.stat().st_mode) & 0o007:
            logger.warning("OPC UA users file %s is readable by everyone: chmod 600 it", path)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, hashed = line.partition(":")
            if not sep or not USER_RE.match(name) or not hashed.startswith("$argon2"):
                raise ConfigError(f"{path}:{n}: expected 'name:$argon2id$...' (names: letters, digits, ._-@)")
            users[name] = hashed
    env_user, env_password = environ.get(OPCUA_USER_ENV), environ.get(OPCUA_PASSWORD_ENV)
    if env_user or env_password:
        if not (env_user and env_password) or not USER_RE.match(env_user):
            raise ConfigError(f"set both {OPCUA_USER_ENV} (letters, digits, ._-@) and {OPCUA_PASSWORD_ENV}, or neither")
        users[env_user] = hash_password(env_password)
    return users


def write_user(users_file: Path, name: str, password: str) -> None:
    """Add or replace `name` in the users file (created 0600)."""
    if not USER_RE.match(name):
        raise ConfigError(f"user name {name!r}: 1-64 letters, digits or ._-@")
    path = Path(users_file)
    lines = path.read_text().splitlines() if path.is_file() else ["# OPC UA users of the inspection runner: name:hash"]
    lines = [ln for ln in lines if ln.partition(":")[0].strip() != name]
    lines.append(f"{name}:{hash_password(password)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, ("\n".join(lines) + "\n").encode())


class PasswordUserManager(UserManager):
    """asyncua's hook at ActivateSession: a User for a right name/password (or anonymous in a lab), else None,
    which asyncua answers with BadUserAccessDenied."""

    def __init__(self, users: Mapping[str, str], allow_anonymous: bool = False, on_refused=None):
        self.users = dict(users)
        self.allow_anonymous = allow_anonymous
        self.on_refused = on_refused  # callback(kind): counts refusals in the runner's metrics
        self._hasher = PasswordHasher()
        self._dummy = self._hasher.hash("not a real password, for constant-time refusals")

    def get_user(self, iserver, username=None, password=None, certificate=None) -> User | None:
        if username is None and password is None:
            if self.allow_anonymous:
                return User(role=UserRole.User, name="anonymous")
            return self._refuse("anonymous", "anonymous session refused")
        name = username or ""
        hashed = self.users.get(name, self._dummy)
        try:
            ok = self._hasher.verify(hashed, password or "") and name in self.users
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok:
            return self._refuse("password", f"wrong user name or password for {name[:64]!r}")
        return User(role=UserRole.User, name=name)  # never Admin: clients cannot add or delete nodes

    def _refuse(self, kind: str, message: str) -> None:
        logger.warning("OPC UA: %s", message)
        if self.on_refused is not None:
            self.on_refused(kind)
        return None


# -- client certificates ----------------------------------------------------------------------------------------


def load_trusted_clients(folder: Path) -> set[bytes]:
    """DER bytes of every certificate (.der/.pem/.crt) in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"opcua.trusted_clients {folder} is not a folder of client certificates")
    out = set()
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".der", ".pem", ".crt", ".cer"):
            continue
        data = path.read_bytes()
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
        out.add(cert.public_bytes(serialization.Encoding.DER))
    if not out:
        raise ConfigError(f"opcua.trusted_clients {folder} holds no certificate (.der, .pem, .crt)")
    return out


def pinned_client_validator(trusted: set[bytes]):
    """asyncua certificate validator: only the client certificates in `trusted` may open a secure session."""

    async def validate(cert: x509.Certificate, app_description: ua.ApplicationDescription) -> None:
        if uacrypto.der_from_x509(cert) not in trusted:
            logger.warning("OPC UA: client certificate of %s is not trusted", app_description.ApplicationUri)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    return validate
