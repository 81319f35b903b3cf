"""Shared test set-up: markers, offline settings, and the session fixtures (one file per stage under fixtures/)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.model",
    "tests.fixtures.serving",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def real_data_dir() -> Path | None:
    value = os.environ.get("INSPECTION_REAL_DATA")
    if not value:
        return None
    path = Path(value)
    return path if path.is_dir() else None


def _cuda_available() -> bool:
    # Avoid importing torch just to decide skips: no driver device node means no CUDA.
    if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_real = real_data_dir() is not None
    has_gpu = None
    for item in items:
        if "real_data" in item.keywords and not has_real:
            item.add_marker(pytest.mark.skip(reason="INSPECTION_REAL_DATA is not set to the real casting photos"))
        if "gpu" in item.keywords:
            if has_gpu is None:
                has_gpu = _cuda_available()
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="no CUDA device"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    # pytest-randomly (dev extra) shuffles modules and tests; `-q` hides its header, so say how to replay this order
    if config.pluginmanager.hasplugin("randomly"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(
            f"test order shuffled by pytest-randomly, seed {seed}; replay: "
            f'make test PYTEST_ARGS="-p randomly --randomly-seed={seed}" (or pytest -p randomly --randomly-seed={seed})'
        )


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip("INSPECTION_REAL_DATA is not set to the real casting photos")
    return path


@pytest.fixture
def review_login():
    """Log into a review app: `review_login(app, username, password, page)` -> (TestClient, the CSRF token that
    `page` carries, for the forms posted from it)."""
    import re

    from fastapi.testclient import TestClient

    def csrf_token(html: str) -> str:
        return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

    def login(app, username: str, password: str, page: str) -> tuple[TestClient, str]:
        client = TestClient(app)
        token = csrf_token(client.get("/login").text)
        data = {"username": username, "password": password, "csrf_token": token}
        assert client.post("/login", data=data, follow_redirects=False).status_code == 303
        return client, csrf_token(client.get(page).text)

    return login
