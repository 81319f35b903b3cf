"""The runner's bearer token on a fresh machine: created once, kept in a file only its owner can read.

`make serve` (deploy/serve.sh) starts the runner with `auth.required: true`, so it needs a token. If
INSPECTION_RUNNER_TOKEN is set, that token is used and nothing is written. Otherwise the token is read from
`var/runner.token`; on the first start that file does not exist and a random token is written there (mode 0600,
created exclusively, so two starts at once cannot both write one) and its path is printed once, on stderr. The
token itself is never printed to the terminal: `python -m inspection.runner.token` writes it to stdout for a
script to capture (serve.sh hands it to the runner process only), and clients read it from the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from inspection.errors import ConfigError
from inspection.runner.config import TOKEN_ENV

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_FILE = Path("var") / "runner.token"
TOKEN_BYTES = 32  # 256 random bits, URL-safe base64: 43 characters
MIN_TOKEN_LENGTH = 16  # a file holding less than this was not written by us: refuse it rather than guess


@dataclass(frozen=True)
class RunnerToken:
    token: str
    source: str  # "env" | "file" | "created"
    path: Path | None  # the token file, None when the token came from the environment


def ensure_runner_token(path: str | Path = DEFAULT_TOKEN_FILE, environ: Mapping[str, str] | None = None) -> RunnerToken:
    """The token to start the runner with: INSPECTION_RUNNER_TOKEN if set, else `path`'s, else a new one in `path`."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(TOKEN_ENV, "").strip()
    if from_env:
        return RunnerToken(from_env, "env", None)
    path = Path(path)
    if path.exists():
        return RunnerToken(_read_token_file(path), "file", path)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start created it between our check and now: use theirs
        return RunnerToken(_read_token_file(path), "file", path)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, 0o600)  # the umask can only narrow O_CREAT's mode; make the intent explicit anyway
    return RunnerToken(token, "created", path)


def _read_token_file(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning("runner token file %s had mode %04o; readable by others: tightened to 0600", path, mode)
        os.chmod(path, 0o600)
    token = path.read_text().strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(
            f"runner token file {path} holds {len(token)} characters (need one line of >= {MIN_TOKEN_LENGTH}, no "
            f"spaces); delete it to have a new token created, or set {TOKEN_ENV}"
        )
    return token


def main(argv: list[str] | None = None) -> int:
    """Print the token to use on stdout (for a script to capture); say on stderr when a new file was created."""
    parser = argparse.ArgumentParser(prog="python -m inspection.runner.token", description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_TOKEN_FILE, help=f"default {DEFAULT_TOKEN_FILE}")
    args = parser.parse_args(argv)
    try:
        result = ensure_runner_token(args.file)
    except (ConfigError, OSError) as exc:
        print(f"runner token: error: {exc}", file=sys.stderr)
        return 1
    if result.source == "created":
        print(
            f"runner token created in {result.path} (mode 0600; reused on every start unless {TOKEN_ENV} is set); "
            f'clients send it as "Authorization: Bearer $(cat {result.path})"',
            file=sys.stderr,
        )
    print(result.token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
