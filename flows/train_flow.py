"""`train` flow: cross-fit (by default) from the manifest; publishes metrics per photo and per part with their
intervals, the model card and plot links. With `registry` (and `product`), that product's golden parts never reach
training."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from inspection.config import load_config
from inspection.registry import product_home
from inspection.reporting import card_markdown, metrics_rows
from inspection.train import TrainConfig, TrainResult, run_train
from inspection.train.evaluate import part_report_rows


def golden_exclusion(registry: str | None, product: str | None = None) -> list[str]:
    """The train override that keeps the golden set of `product` in `registry` out of training (none without
    one)."""
    golden = product_home(registry, product) / "golden.json" if registry else None
    return [f"exclude={golden.resolve()}"] if golden is not None and golden.is_file() else []


@task
def train_model(config_path: str | None, overrides: list[str], store: str, out: str) -> TrainResult:
    config = load_config(TrainConfig, config_path, overrides)
    return run_train(config, Path(store), Path(out))


@flow(name="train")
def train_flow(
    store: str,
    out: str,
    mode: Literal["head", "partial", "full"] | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    registry: str | None = None,
    product: str | None = None,
) -> str:
    """Train a run directory `out` from the ingest store `store`; returns the run directory.

    `mode` (None: the config's), `registry`: the golden set of its `product` (None: the registry's default
    product) is excluded from training and calibration."""
    logger = get_run_logger()
    extra = ([f"mode={mode}"] if mode else []) + golden_exclusion(registry, product)
    result = train_model(config, [*extra, *(overrides or [])], store, out)
    run_dir = result.run_dir
    create_table_artifact(key="train-metrics", table=metrics_rows(result.metrics), description=f"Metrics of {run_dir}")
    for split, report in result.parts.items():
        create_table_artifact(
            key=f"train-parts-{split}",
            table=part_report_rows(report),
            description=f"{split}: per photo and per physical part, 95 % intervals ({report['n_parts']} parts)",
        )
    create_markdown_artifact(key="model-card", markdown=card_markdown(result.card), description="Model card")
    for plot in sorted((run_dir / "plots").glob("*.png")):
        create_link_artifact(key=f"plot-{plot.stem.replace('_', '-')}"[:60], link=plot.resolve().as_uri())
    logger.info("trained %s", run_dir)
    return str(run_dir)


if __name__ == "__main__":
    import sys

    train_flow(store=sys.argv[1], out=sys.argv[2])
