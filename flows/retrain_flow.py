"""`retrain` flow (nightly): ingest -> train -> export_and_register -> deploy, so labels confirmed or overridden
by QA reach the line without anyone running a command."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task

from flows.deploy_flow import deploy_flow
from flows.export_register_flow import export_and_register_flow
from flows.ingest_flow import ingest_flow
from flows.train_flow import train_flow
from inspection.config import load_config
from inspection.registry import CONFIG_NAME, Registry, RegistryConfig, product_home


@task
def ensure_registry(registry: str, golden_from: str, config: str | None, product: str | None = None) -> None:
    """A new plant's registry (or a new product in it) freezes its golden set (whole parts sampled from the store)
    on the first retrain; training then keeps those parts out."""
    if not (product_home(registry, product) / CONFIG_NAME).is_file():
        limits = load_config(RegistryConfig, config, [f"golden_set={Path(golden_from).resolve()}"])
        Registry.init(Path(registry), limits, product=product)


@flow(name="retrain")
def retrain_flow(
    sources: list[str],
    store: str,
    runs_dir: str,
    registry: str,
    review_db: str | None = None,
    mode: Literal["head", "partial", "full"] | None = None,
    train_config: str | None = None,
    train_overrides: list[str] | None = None,
    int8: bool = False,
    registry_config: str | None = None,
    product: str | None = None,
) -> dict:
    """Returns {"counts", "run_dir", "version", "promoted", "gate"}.

    `product`: the registry product the new version is registered, gated and promoted for, whose golden set stays
    out of training (None: the registry's default product; one deployment per product, each with its own store).
    `registry_config` (gate limits, YAML) is used only when the product does not exist in the registry yet.
    """
    logger = get_run_logger()
    counts = ingest_flow(sources=sources, store=store, review_db=review_db)
    ensure_registry(registry, store, registry_config, product)
    run_dir = Path(runs_dir) / datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    trained = train_flow(
        store=store,
        out=str(run_dir),
        mode=mode,
        config=train_config,
        overrides=train_overrides,
        registry=registry,
        product=product,
    )
    version = export_and_register_flow(run_dir=trained, registry=registry, int8=int8, product=product)
    gate = deploy_flow(registry=registry, version=version, reason=f"retrain {run_dir.name}", product=product)
    logger.info("retrain (product %s): %s -> %s (promoted: %s)", product, run_dir.name, version, gate.get("promoted"))
    return {
        "counts": counts,
        "run_dir": trained,
        "version": version,
        "promoted": bool(gate.get("promoted")),
        "gate": gate,
    }


if __name__ == "__main__":
    import sys

    retrain_flow(sources=[sys.argv[1]], store=sys.argv[2], runs_dir=sys.argv[3], registry=sys.argv[4])
