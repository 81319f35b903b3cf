"""OPC UA and outbox settings: command-line flags, YAML, and what validation refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from inspection.config import load_config
from inspection.errors import ConfigError
from inspection.runner.cli import add_arguments, build_config, main
from inspection.runner.config import RunnerConfig
from inspection.runner.opcua.security import load_users


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_serve_flags_reach_the_config(tmp_path):
    cfg = build_config(
        _args(
            "serve",
            "--registry",
            str(tmp_path),
            "--opcua",
            "opc.tcp://0.0.0.0:4840",
            "--opcua-users",
            str(tmp_path / "users"),
            "--opcua-image-root",
            "/data/camera one",
            "--opcua-image-root",
            "/data/cam2",
        )
    )
    assert cfg.opcua.endpoint == "opc.tcp://0.0.0.0:4840" and cfg.opcua.insecure is False
    assert cfg.opcua.users_file == tmp_path / "users"
    assert cfg.opcua.image_roots == (Path("/data/camera one"), Path("/data/cam2"))
    assert cfg.opcua_stations == (cfg.station,)
    assert build_config(_args("serve", "--registry", str(tmp_path))).opcua.endpoint is None  # off by default
    assert build_config(_args("serve", "--registry", str(tmp_path), "--opcua-insecure")).opcua.insecure


@pytest.mark.parametrize(
    "override",
    ["opcua.endpoint=http://0.0.0.0:4840", "opcua.endpoint=opc.tcp://host", "opcua.stations=[a/b]"],
)
def test_bad_opcua_settings_are_refused(override):
    with pytest.raises(ConfigError, match="opcua"):
        load_config(RunnerConfig, None, [override])


def test_outbox_settings_are_checked():
    with pytest.raises(ConfigError, match="outbox"):
        load_config(RunnerConfig, None, ["mqtt.outbox_batch=0"])
    assert load_config(RunnerConfig, "configs/runner.yaml").mqtt.outbox_max_rows == 1_000_000


def test_opcua_user_command_writes_a_hashed_user(tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    users = tmp_path / "users"
    assert main(_args("opcua-user", "plc", "--users-file", str(users), "--password-stdin")) == 0
    assert list(load_users(users, environ={})) == ["plc"] and "a-long-password" not in users.read_text()
