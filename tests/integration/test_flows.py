"""The Prefect flows end to end on synthetic castings, under a temporary Prefect server.

Each test builds its own plant (camera share, store, registry, decision store) and needs no other test before it.
Where a test needs a production model of known quality it registers `known_export` (tests/fixtures/model.py), whose
verdicts on the synthetic parts are fixed by construction; models trained here by the flows (the tiny network of
configs/train_tiny.yaml) are judged by the gate, but no assertion hinges on what they happened to learn.
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


@pytest.fixture
def plant(synth_dir: Path, tmp_path: Path) -> dict[str, Path]:
    """A fresh plant for one test: its camera share (a copy of the synthetic castings) and where its store, runs,
    registry and decision store go (not created)."""
    root = tmp_path / "plant"
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


def test_train_export_deploy_flows(harness, plant, synth_store: Path) -> None:
    from flows.deploy_flow import deploy_flow
    from flows.export_register_flow import export_and_register_flow
    from flows.train_flow import train_flow
    from inspection.registry import Registry, RegistryConfig

    # This test is about the flows handing a run on to a registered, gated, promoted version, not about how well a
    # tiny network learns in a few epochs on this CPU: the operator opens the first-model limits, so the gate runs
    # (and reports its figures) but its answer does not hinge on the training. The limits themselves are tested with
    # a model of known quality in tests/unit/test_registry.py and below.
    open_limits = RegistryConfig(golden_set=str(synth_store), max_escape_rate=1.0, max_false_reject_rate=1.0)
    Registry.init(plant["registry"], open_limits)
    run_dir = train_flow(
        store=str(synth_store),
        out=str(plant["runs"] / "first"),
        mode="full",
        config=TINY,
        registry=str(plant["registry"]),
    )  # with the registry: its golden parts stay out of training
    assert (Path(run_dir) / "checkpoint.pt").is_file()
    assert "accuracy" in _artifact("train-metrics").data
    assert "# Model" in _artifact("model-card").data
    version = export_and_register_flow(run_dir=run_dir, registry=str(plant["registry"]))
    reg = Registry(plant["registry"])
    assert version in reg.versions()
    report = deploy_flow(registry=str(plant["registry"]), version=version, reason="first model")
    assert report["promoted"] and not report["forced"], report
    assert set(report["candidate"]) >= {"escape_rate", "false_reject_rate"}, report
    assert reg.alias("production") == version


def test_failed_gate_leaves_production_untouched(
    harness, plant, known_export: Path, synth_store: Path, tmp_path
) -> None:
    """A model of known quality passes the shipped gate through the flow; a candidate that lets every defect pass is
    refused, and production and its history stay as they were."""
    from flows.deploy_flow import deploy_flow
    from inspection.registry import Registry, RegistryConfig

    reg = Registry.init(plant["registry"], RegistryConfig(golden_set=str(synth_store)))
    production = reg.register(known_export)
    first = deploy_flow(registry=str(plant["registry"]), version=production, reason="first model")
    assert first["promoted"] and not first["forced"], first
    assert reg.alias("production") == production
    bad = _register_blind_candidate(reg, production, tmp_path)
    n_history = len(reg.history())
    report = deploy_flow(registry=str(plant["registry"]), version=bad, reason="should be refused")
    assert not report["promoted"]
    assert "escape rate" in report["reason"], report["reason"]
    assert reg.alias("production") == production
    assert len(reg.history()) >= n_history  # the refusal may be logged, but nothing is rolled over
    assert [h["action"] for h in reg.history() if h["action"] == "promote"] == ["promote"]


def test_flows_take_the_product(harness, plant, known_export: Path, synth_store: Path) -> None:
    """Each flow passes its `product` to the registry: a new product gets its own golden set (kept out of its
    training), its versions are registered, gated and promoted for it alone, and the default product is untouched."""
    from flows.deploy_flow import deploy_flow
    from flows.export_register_flow import register_export
    from flows.retrain_flow import ensure_registry
    from flows.train_flow import golden_exclusion
    from inspection.registry import Registry

    root = plant["registry"]
    ensure_registry.fn(str(root), str(synth_store), None, "tile")
    golden = root / "products" / "tile" / "golden.json"
    assert golden.is_file() and not (root / "golden.json").exists()
    assert golden_exclusion(str(root), "tile") == [f"exclude={golden.resolve()}"]
    assert golden_exclusion(str(root)) == []  # the default product has no golden set here
    version = register_export.fn(str(root), str(known_export), "tile")
    report = deploy_flow(registry=str(root), product="tile", reason="first tile model")  # the product's newest
    assert report["promoted"] and not report["forced"] and report["product"] == "tile", report
    assert Registry(root, product="tile").alias("production") == version
    assert Registry(root).alias("production") is None and Registry(root).versions() == []
    with pytest.raises(ValueError, match="no versions of product 'default'"):
        deploy_flow(registry=str(root))


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


def test_retrain_picks_up_a_review_and_the_promoted_model_reaches_a_running_runner(
    harness, plant, known_export: Path
) -> None:
    """A line image flagged by the runner and overridden in the review app becomes an `ok` training label;
    `retrain` trains, registers and promotes a new version, and the running runner swaps to it."""
    from flows.retrain_flow import retrain_flow
    from inspection.config import load_config
    from inspection.images import read_image
    from inspection.ingest import IngestConfig, read_records, run_ingest
    from inspection.registry import Registry, RegistryConfig
    from inspection.runner import RunnerConfig, create_app
    from inspection.synth import DEFECT_FOLDER, render_part

    run_ingest(IngestConfig(progress=False), [plant["incoming"]], plant["store"])
    reg = Registry.init(plant["registry"], RegistryConfig(golden_set=str(plant["store"])))
    before = reg.register(known_export)
    assert reg.promote(before, reason="known model in production").promoted
    config = load_config(
        RunnerConfig,
        None,
        [f"registry={plant['registry']}", "station=line-1", f"store={plant['decisions']}", "auth.token=t0ken"]
        + ["swap.poll_s=0.2"],
    )
    headers = {"Authorization": "Bearer t0ken", "Content-Type": "image/png"}
    with serve_in_thread(create_app(config)) as base:
        _wait(lambda: httpx.get(f"{base}/readyz").status_code == 200)
        # the line photographs a known defective part again (one pixel differs: a new image to the store); the
        # known model rejects it by construction
        image = read_image(sorted((plant["incoming"] / DEFECT_FOLDER).glob("*.png"))[0]).copy()
        image[0, 0] = image[0, 0] ^ 1
        r = httpx.post(f"{base}/v1/inspect", params={"part_id": "p0"}, content=encode_png(image), headers=headers)
        assert r.status_code == 200, r.text
        flagged = r.json()
        assert flagged["verdict"] == "reject", flagged
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
