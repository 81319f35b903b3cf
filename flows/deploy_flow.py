"""`deploy` flow: gate a registered version against production on the golden set; promote it or stop with
the reason. A promotion changes the registry's `production` alias, which running runners hot-swap to."""

from __future__ import annotations

import getpass
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from inspection.registry import Registry


@task(retries=2, retry_delay_seconds=10)  # the registry may sit on a network share
def gate_and_promote(registry: str, version: str, reason: str, force: bool) -> Any:
    return Registry(Path(registry)).promote(version, reason=reason, user=f"prefect:{getpass.getuser()}", force=force)


def _as_dict(report: Any) -> dict[str, Any]:
    if is_dataclass(report):
        return asdict(report)
    if hasattr(report, "model_dump"):
        return report.model_dump(mode="json")
    return dict(report)


@flow(name="deploy")
def deploy_flow(
    registry: str, version: str | None = None, reason: str = "scheduled deploy", force: bool = False
) -> dict:
    """Promote `version` (default: the newest registered) if it passes the gate; returns the gate report."""
    logger = get_run_logger()
    reg = Registry(Path(registry))
    if version is None:
        versions = reg.versions()
        if not versions:
            raise ValueError(f"registry {registry} holds no versions to deploy")
        version = versions[-1]
    report = _as_dict(gate_and_promote(registry, version, reason, force))
    create_table_artifact(key="gate", table=report.get("rows") or [report], description=f"Gate for {version}")
    if report.get("promoted"):
        logger.info("promoted %s to production", version)
    else:
        logger.warning("%s not promoted: %s", version, report.get("reason"))
    return report


if __name__ == "__main__":
    import sys

    deploy_flow(registry=sys.argv[1], version=sys.argv[2] if len(sys.argv) > 2 else None)
