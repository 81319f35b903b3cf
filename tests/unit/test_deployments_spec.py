"""deploy/deployments.yaml: every deployment names a flow that exists and only parameters that flow takes; one
retrain and one deploy per product, each product with its own store and runs."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

SPEC = Path(__file__).resolve().parents[2] / "deploy" / "deployments.yaml"


def test_every_deployment_calls_its_flow_with_parameters_it_takes() -> None:
    from deploy.serve_flows import load_flow

    spec = yaml.safe_load(SPEC.read_text())
    for name, item in spec["deployments"].items():
        flow = load_flow(item["flow"])
        accepted = set(inspect.signature(flow.fn).parameters)
        unknown = set(item.get("parameters") or {}) - accepted
        assert not unknown, f"deployment {name}: {flow.name} takes no {sorted(unknown)}"


def test_one_retrain_and_deploy_per_product_with_their_own_data() -> None:
    deployments = yaml.safe_load(SPEC.read_text())["deployments"]
    retrains = {d["parameters"]["product"]: d["parameters"] for d in deployments.values() if "retrain" in d["flow"]}
    deploys = {d["parameters"]["product"] for d in deployments.values() if d["flow"].endswith(":deploy_flow")}
    assert set(retrains) == deploys and len(retrains) >= 2
    for key in ("store", "runs_dir"):
        assert len({p[key] for p in retrains.values()}) == len(retrains), f"products share their {key}"
    assert len({p["registry"] for p in retrains.values()}) == 1  # one registry folder, a product in it each
