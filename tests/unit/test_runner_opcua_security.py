"""OPC UA security pieces: users file, password check, the server certificate made on first start."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509

from inspection.errors import ConfigError
from inspection.runner.opcua.security import (
    CERT_FILE,
    KEY_FILE,
    PasswordUserManager,
    ensure_server_certificate,
    load_users,
    write_user,
)


def test_users_file_round_trip_and_replace(tmp_path):
    path = tmp_path / "users"
    write_user(path, "plc", "first-password")
    write_user(path, "scada", "second-password")
    write_user(path, "plc", "changed-password")  # replaces, keeps the others
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = load_users(path, environ={})
    assert sorted(users) == ["plc", "scada"] and all(h.startswith("$argon2id$") for h in users.values())
    assert "changed-password" not in path.read_text()
    mgr = PasswordUserManager(users)
    assert mgr.get_user(None, "plc", "changed-password").name == "plc"
    assert mgr.get_user(None, "plc", "first-password") is None
    assert mgr.get_user(None, "nobody", "changed-password") is None
    assert mgr.get_user(None, None, None) is None  # anonymous


def test_env_user_and_anonymous_only_when_allowed(tmp_path):
    users = load_users(None, environ={"INSPECTION_OPCUA_USER": "plc", "INSPECTION_OPCUA_PASSWORD": "from-env-pw"})
    refused = []
    mgr = PasswordUserManager(users, on_refused=refused.append)
    assert mgr.get_user(None, "plc", "from-env-pw").name == "plc"
    assert mgr.get_user(None, None, None) is None and mgr.get_user(None, "plc", "x") is None
    assert refused == ["anonymous", "password"]
    assert PasswordUserManager({}, allow_anonymous=True).get_user(None, None, None).name == "anonymous"


@pytest.mark.parametrize(
    ("text", "environ", "match"),
    [
        ("plc:plaintext\n", {}, "expected 'name:"),
        ("bad name:$argon2id$x\n", {}, "expected 'name:"),
        ("", {"INSPECTION_OPCUA_USER": "plc"}, "set both"),
    ],
)
def test_bad_users_are_refused_at_start(tmp_path, text, environ, match):
    path = tmp_path / "users"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_users(path, environ=environ)
    with pytest.raises(ConfigError, match="does not exist"):
        load_users(tmp_path / "missing", environ={})
    with pytest.raises(ConfigError, match="at least 8"):
        write_user(path, "plc", "short")


def test_certificate_made_once_and_renewed_when_the_uri_changes(tmp_path):
    d = tmp_path / "opcua"
    cert, key = ensure_server_certificate(d, "urn:box:inspection:runner", hostnames=("line3-pc", "10.0.0.7"))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    first = cert.read_bytes()
    parsed = x509.load_der_x509_certificate(first)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:box:inspection:runner" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert "line3-pc" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.7"]
    key_bytes = key.read_bytes()
    assert ensure_server_certificate(d, "urn:box:inspection:runner")[0].read_bytes() == first  # reused
    renewed = ensure_server_certificate(d, "urn:other:inspection:runner")[0].read_bytes()
    assert renewed != first and key.read_bytes() == key_bytes  # new certificate, same key
    key.chmod(0o644)
    ensure_server_certificate(d, "urn:other:inspection:runner")
    assert stat.S_IMODE((d / KEY_FILE).stat().st_mode) == 0o600 and (d / CERT_FILE).read_bytes() == renewed
