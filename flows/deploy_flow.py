"""`deploy` flow: gate a registered version of a product against that product's production on its golden set;
promote it or stop with the reason. A promotion changes the product's `production` alias, which running runners
hot-swap to (that product only)."""

from __future__ import annotations

import getpass
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from inspection.registry import Registry


@task(retries=2, retry_delay_seconds=10)  # the registry may sit on a network share
def gate_and_promote(registry: str, version: str, reason: str, force: bool, product: str | None = None) -> Any:
    reg = Registry(Path(registry), product=product)
    return reg.promote(version, reason=reason, user=f"prefect:{getpass.getuser()}", force=force)


def _as_dict(report: Any) -> dict[str, Any]:
    if is_dataclass(report):
        return asdict(report)
    if hasattr(report, "model_dump"):
        return report.model_dump(mode="json")
    return dict(report)


@flow(name="deploy")
def deploy_flow(
    registry: str,
    version: str | None = None,
    reason: str = "scheduled deploy",
    force: bool = False,
    product: str | None = None,
) -> dict:
    """Promote `version` of `product` (None: the registry's default product; version default: the product's newest
    registered) if it passes the gate; returns the gate report."""
    logger = get_run_logger()
    reg = Registry(Path(registry), product=product)
    if version is None:
        versions = reg.versions()
        if not versions:
            raise ValueError(f"registry {registry} holds no versions of product {reg.product!r} to deploy")
        version = versions[-1]
    report = _as_dict(gate_and_promote(registry, version, reason, force, product))
    report["product"] = reg.product
    create_table_artifact(
        key="gate", table=report.get("rows") or [report], description=f"Gate for {version} (product {reg.product})"
    )
    if report.get("promoted"):
        logger.info("promoted %s to production of product %s", version, reg.product)
    else:
        logger.warning("%s not promoted: %s", version, report.get("reason"))
    return report


if __name__ == "__main__":
    import sys

    deploy_flow(registry=sys.argv[1], version=sys.argv[2] if len(sys.argv) > 2 else None)
