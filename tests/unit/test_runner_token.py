"""The runner token of `make serve`: created once with mode 0600, reused on the next start, the environment wins."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from inspection.errors import ConfigError
from inspection.runner.config import TOKEN_ENV
from inspection.runner.token import ensure_runner_token

REPO_ROOT = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_creates_a_private_token_and_the_second_reuses_it(tmp_path: Path) -> None:
    path = tmp_path / "var" / "runner.token"
    old_umask = os.umask(0o000)  # even with a permissive umask the file is the owner's alone
    try:
        first = ensure_runner_token(path, environ={})
    finally:
        os.umask(old_umask)
    assert first.source == "created" and first.path == path
    assert _mode(path) == 0o600 and path.read_text() == first.token + "\n"
    assert len(first.token) >= 40 and first.token.isascii() and not any(c.isspace() for c in first.token)
    second = ensure_runner_token(path, environ={})
    assert (second.source, second.token) == ("file", first.token)
    assert ensure_runner_token(tmp_path / "other.token", environ={}).token != first.token  # random, not derived


def test_the_environment_wins_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "runner.token"
    got = ensure_runner_token(path, environ={TOKEN_ENV: "from-the-environment-0123"})
    assert (got.source, got.token, got.path) == ("env", "from-the-environment-0123", None)
    assert not path.exists()
    existing = ensure_runner_token(path, environ={}).token
    assert ensure_runner_token(path, environ={TOKEN_ENV: "another-token-from-env"}).token == "another-token-from-env"
    assert path.read_text().strip() == existing  # the file is left alone
    assert ensure_runner_token(path, environ={TOKEN_ENV: "  "}).token == existing  # blank counts as unset


def test_a_token_file_readable_by_others_is_tightened_and_a_bad_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "runner.token"
    path.write_text("a-token-someone-wrote-by-hand\n")
    path.chmod(0o644)
    assert ensure_runner_token(path, environ={}).token == "a-token-someone-wrote-by-hand"
    assert _mode(path) == 0o600
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="delete it"):
        ensure_runner_token(path, environ={})


def test_command_prints_the_path_once_and_the_token_only_on_stdout(tmp_path: Path) -> None:
    path = tmp_path / "var" / "runner.token"
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}

    def run(extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "inspection.runner.token", "--file", str(path)]
        return subprocess.run(cmd, cwd=REPO_ROOT, env={**env, **(extra_env or {})}, capture_output=True, text=True)

    first = run()
    assert first.returncode == 0, first.stderr
    token = path.read_text().strip()
    assert first.stdout == token + "\n"
    assert str(path) in first.stderr and "0600" in first.stderr and token not in first.stderr
    second = run()
    assert second.returncode == 0 and second.stdout == token + "\n" and second.stderr == ""
    third = run({TOKEN_ENV: "set-by-the-operator-42"})
    assert third.returncode == 0 and third.stdout == "set-by-the-operator-42\n" and third.stderr == ""
    path.write_text("x\n")
    broken = run()
    assert broken.returncode == 1 and "delete it" in broken.stderr and broken.stdout == ""
