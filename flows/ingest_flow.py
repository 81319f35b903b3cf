"""`ingest` flow (hourly): new camera images and reviewed QA decisions into the manifest."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from inspection.config import load_config
from inspection.ingest import IngestConfig, IngestResult, apply_review_labels, run_ingest


@task(retries=2, retry_delay_seconds=10)  # camera shares and storage drop out briefly; retry only that I/O
def ingest_sources(config_path: str | None, sources: list[str], store: str) -> IngestResult:
    config = load_config(IngestConfig, config_path)
    return run_ingest(config, [Path(s) for s in sources], Path(store))


@task(retries=2, retry_delay_seconds=10)
def collect_review_labels(review_db: str) -> list:
    from inspection.review.queries import reviewed_labels

    return reviewed_labels(review_db)


@task
def apply_labels(store: str, labels: list) -> int:
    return apply_review_labels(Path(store), labels)


@flow(name="ingest", log_prints=False)
def ingest_flow(
    sources: list[str],
    store: str,
    review_db: str | None = None,
    config: str | None = None,
) -> dict:
    """Ingest drop folders into `store`; then apply QA review labels from `review_db` (they take precedence)."""
    logger = get_run_logger()
    result = ingest_sources(config, sources, store)
    relabelled = 0
    if review_db:
        labels = collect_review_labels(review_db)
        relabelled = apply_labels(store, labels)
    counts = {
        "files_seen": result.n_files,
        "already_known": result.already_known,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        **{f"quarantined:{reason}": n for reason, n in sorted(result.quarantined.items())},
        "near_duplicate_groups": result.groups,
        "images_in_store": result.total_accepted,
        "review_labels_applied": relabelled,
    }
    create_table_artifact(
        key="ingest-counts",
        table=[{"what": k, "count": v} for k, v in counts.items()],
        description=f"Ingest of {', '.join(sources)} into {store}",
    )
    logger.info("ingest: %s", counts)
    return counts


if __name__ == "__main__":
    import sys

    ingest_flow(sources=sys.argv[1:-1] or ["data/incoming"], store=sys.argv[-1] if len(sys.argv) > 1 else "data/store")
