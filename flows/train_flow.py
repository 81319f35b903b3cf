"""`train` flow: fine-tune from the manifest with a chosen mode; publishes metrics, model card and plot links."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from inspection.config import load_config
from inspection.reporting import card_markdown, metrics_rows
from inspection.train import TrainConfig, TrainResult, run_train


@task
def train_model(config_path: str | None, overrides: list[str], store: str, out: str) -> TrainResult:
    config = load_config(TrainConfig, config_path, overrides)
    return run_train(config, Path(store), Path(out))


@flow(name="train")
def train_flow(
    store: str,
    out: str,
    mode: Literal["head", "partial", "full"] = "partial",
    config: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Train a run directory `out` from the ingest store `store`; returns the run directory."""
    logger = get_run_logger()
    result = train_model(config, [f"mode={mode}", *(overrides or [])], store, out)
    run_dir = result.run_dir
    create_table_artifact(key="train-metrics", table=metrics_rows(result.metrics), description=f"Metrics of {run_dir}")
    create_markdown_artifact(key="model-card", markdown=card_markdown(result.card), description="Model card")
    for plot in sorted((run_dir / "plots").glob("*.png")):
        create_link_artifact(key=f"plot-{plot.stem.replace('_', '-')}"[:60], link=plot.resolve().as_uri())
    logger.info("trained %s", run_dir)
    return str(run_dir)


if __name__ == "__main__":
    import sys

    train_flow(store=sys.argv[1], out=sys.argv[2])
