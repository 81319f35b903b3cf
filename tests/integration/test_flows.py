"""The Prefect flows end to end on synthetic castings with a tiny model, under a temporary Prefect server.

One module-scoped plant (store, runs, registry) goes through the flows in order, as the nightly `retrain` would.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from inspection.images import encode_png
from tests.fixtures.serving import serve_in_thread

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = str(REPO_ROOT / "configs" / "train_tiny.yaml")
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def plant(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plant")
    incoming = root / "incoming"
    shutil.copytree(synth_dir, incoming)
    return {
        "root": root,
        "incoming": incoming,
        "store": root / "store",
        "runs": root / "runs",
        "registry": root / "registry",
        "decisions": root / "decisions",
    }


def _artifact(key: str):
    from prefect.artifacts import Artifact

    artifact = Artifact.get(key)
    assert artifact is not None, f"no artifact {key!r}"
    return artifact


def test_ingest_flow_counts_and_is_idempotent(harness, plant) -> None:
    from flows.ingest_flow import ingest_flow

    counts = ingest_flow(sources=[str(plant["incoming"])], store=str(plant["store"]))
    n_files = sum(1 for p in plant["incoming"].rglob("*") if p.is_file())
    assert counts["accepted"] == n_files and counts["files_seen"] == n_files
    table = json.loads(_artifact("ingest-counts").data)
    assert {"what": "accepted", "count": n_files} in table
    again = ingest_flow(sources=[str(plant["incoming"])], store=str(plant["store"]))
    assert again["accepted"] == 0 and again["already_known"] == n_files


def test_ingest_flow_rejects_bad_parameters(harness, plant) -> None:
    from flows.ingest_flow import ingest_flow

    with pytest.raises(Exception, match="sources"):
        ingest_flow(sources="not-a-list-of-folders", store=str(plant["store"]))  # type: ignore[arg-type]


def test_train_export_deploy_flows(harness, plant) -> None:
    from flows.deploy_flow import deploy_flow
    from flows.export_register_flow import export_and_register_flow
    from flows.train_flow import train_flow
    from inspection.registry import Registry, RegistryConfig

    # the operator sets the registry up once; the tiny test model is far from line-ready, so its first-model
    # false-reject limit is opened (the relative gate against production stays as strict as configured)
    Registry.init(plant["registry"], RegistryConfig(golden_set=str(plant["store"]), max_false_reject_rate=1.0))
    run_dir = train_flow(store=str(plant["store"]), out=str(plant["runs"] / "first"), mode="full", config=TINY)
    assert (Path(run_dir) / "checkpoint.pt").is_file()
    assert "accuracy" in _artifact("train-metrics").data
    assert "# Model" in _artifact("model-card").data
    version = export_and_register_flow(run_dir=run_dir, registry=str(plant["registry"]))
    reg = Registry(plant["registry"])
    assert version in reg.versions()
    report = deploy_flow(registry=str(plant["registry"]), version=version, reason="first model")
    assert report["promoted"], report
    assert reg.alias("production") == version


def test_failed_gate_leaves_production_untouched(harness, plant, tmp_path) -> None:
    """A candidate that lets every defect pass is refused; production and its history entry stay as they were."""
    from flows.deploy_flow import deploy_flow
    from inspection.registry import Registry

    reg = Registry(plant["registry"])
    production = reg.alias("production")
    assert production is not None, "needs test_train_export_deploy_flows first"
    bad = _register_blind_candidate(reg, production, tmp_path)
    n_history = len(reg.history())
    report = deploy_flow(registry=str(plant["registry"]), version=bad, reason="should be refused")
    assert not report["promoted"]
    assert report["reason"]
    assert reg.alias("production") == production
    assert len(reg.history()) >= n_history  # the refusal may be logged, but nothing is rolled over


def _register_blind_candidate(reg, production: str, tmp_path: Path) -> str:
    """Re-export production with a reject/review threshold of 1.0: the same scores, but every part passes."""
    import onnx

    from inspection.onnx_infer import sha256_file
    from inspection.schemas import ModelCard

    src = reg.get(production)
    out = tmp_path / "blind"
    shutil.copytree(src.dir, out)
    card = src.card.model_copy(
        update={"version": "blind", "thresholds": src.card.thresholds.model_copy(update={"reject": 1.0, "review": 1.0})}
    )
    model = onnx.load(str(out / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "model_card":
            prop.value = card.model_copy(update={"files": {}}).model_dump_json()
    onnx.save(model, str(out / "model.onnx"))
    for extra in out.glob("model.int8.onnx"):
        extra.unlink()
    files = {"model.onnx": sha256_file(out / "model.onnx")}
    (out / "model_card.json").write_text(
        ModelCard.model_validate(card.model_dump() | {"files": files}).model_dump_json()
    )
    return reg.register(out)


def _review_app_decision(decisions: Path, request_id: str, action: str) -> None:
    """Make the decision the way a QA engineer does: log in to the review app, post the form with its CSRF token."""
    from fastapi.testclient import TestClient

    from inspection.review import ReviewConfig, create_app

    config = ReviewConfig(store=str(decisions), password_time_cost=1, password_memory_kib=1024)
    app = create_app(config)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    with TestClient(app) as client:

        def csrf(html: str) -> str:
            return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

        r = client.post(
            "/login",
            data={"username": "rita", "password": PASSWORD, "csrf_token": csrf(client.get("/login").text)},
            follow_redirects=False,
        )
        assert r.status_code == 303
        token = csrf(client.get("/queue").text)
        r = client.post(
            f"/parts/{request_id}/decision",
            data={"csrf_token": token, "action": action, "expected": ""},
            follow_redirects=False,
        )
        assert r.status_code in (200, 303), r.text


def test_retrain_picks_up_a_review_and_the_promoted_model_reaches_a_running_runner(harness, plant) -> None:
    """A line image flagged by the runner and overridden in the review app becomes an `ok` training label;
    `retrain` trains, registers and promotes a new version, and the running runner swaps to it."""
    from flows.retrain_flow import retrain_flow
    from inspection.config import load_config
    from inspection.ingest import read_records
    from inspection.registry import Registry
    from inspection.runner import RunnerConfig, create_app
    from inspection.synth import render_part

    reg = Registry(plant["registry"])
    before = reg.alias("production")
    assert before is not None, "needs test_train_export_deploy_flows first"
    config = load_config(
        RunnerConfig,
        None,
        [f"registry={plant['registry']}", "station=line-1", f"store={plant['decisions']}", "auth.token=t0ken"]
        + ["swap.poll_s=0.2"],
    )
    headers = {"Authorization": "Bearer t0ken", "Content-Type": "image/png"}
    with serve_in_thread(create_app(config)) as base:
        _wait(lambda: httpx.get(f"{base}/readyz").status_code == 200)
        # the line sends parts until one is flagged (the tiny model flags plenty of these)
        flagged = None
        for i in range(40):
            image, _ = render_part(__import__("numpy").random.default_rng(1000 + i), defect=True)
            body = encode_png(image)
            r = httpx.post(f"{base}/v1/inspect", params={"part_id": f"p{i}"}, content=body, headers=headers)
            assert r.status_code == 200, r.text
            if r.json()["verdict"] != "pass":
                flagged = r.json()
                break
        assert flagged is not None, "no part was flagged"
        assert flagged["model_version"] == before

        _review_app_decision(plant["decisions"], flagged["request_id"], "override_ok")

        result = retrain_flow(
            sources=[str(plant["incoming"])],
            store=str(plant["store"]),
            runs_dir=str(plant["runs"]),
            registry=str(plant["registry"]),
            review_db=str(plant["decisions"]),
            mode="full",
            train_config=TINY,
            train_overrides=["seed=1"],
        )
        records = {r.sha256: r for r in read_records(plant["store"], status="accepted")}
        reviewed = records[flagged["image_sha256"]]
        assert reviewed.label == "ok" and reviewed.label_source == "review"
        assert result["counts"]["reviewed_parts_exported"] == 1
        if not result["promoted"]:  # the gate is honest; force only to show the swap path, and say so
            from flows.deploy_flow import deploy_flow

            report = deploy_flow(
                registry=str(plant["registry"]), version=result["version"], reason="test: force", force=True
            )
            assert report["promoted"]
        new = reg.alias("production")
        assert new == result["version"] != before

        def served_version() -> str:
            image, _ = render_part(__import__("numpy").random.default_rng(5), defect=False)
            r = httpx.post(
                f"{base}/v1/inspect", params={"part_id": "after"}, content=encode_png(image), headers=headers
            )
            assert r.status_code == 200
            return r.json()["model_version"]

        _wait(lambda: served_version() == new, timeout=60)


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("condition not met in time")
