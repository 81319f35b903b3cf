"""`export_and_register` flow: export a run to ONNX (parity-checked, optional INT8) and register the version for a
product."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from inspection.export import ExportConfig, export_onnx
from inspection.registry import Registry


@task
def export_run(run_dir: str, out: str, int8: bool) -> str:
    result = export_onnx(ExportConfig(int8=int8), Path(run_dir), Path(out))
    return str(result.out)


@task(retries=2, retry_delay_seconds=10)  # the registry may sit on a network share
def register_export(registry: str, export_dir: str, product: str | None = None) -> str:
    return Registry(Path(registry), product=product).register(Path(export_dir))


@flow(name="export_and_register")
def export_and_register_flow(run_dir: str, registry: str, int8: bool = False, product: str | None = None) -> str:
    """Export `run_dir` next to it (`<run_dir>/export`) and register it for `product` (None: the registry's
    default product); returns the new version id."""
    logger = get_run_logger()
    export_dir = export_run(run_dir, str(Path(run_dir) / "export"), int8)
    version = register_export(registry, export_dir, product)
    reg = Registry(Path(registry), product=product)
    card = reg.get(version).card
    create_table_artifact(
        key="registered-version",
        table=[
            {
                "product": reg.product,
                "version": version,
                "files": ", ".join(sorted(card.files)),
                "reject": card.thresholds.reject,
                "review": card.thresholds.review,
            }
        ],
    )
    logger.info("registered %s (product %s) from %s", version, reg.product, run_dir)
    return version


if __name__ == "__main__":
    import sys

    export_and_register_flow(run_dir=sys.argv[1], registry=sys.argv[2])
