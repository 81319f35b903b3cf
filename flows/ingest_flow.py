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


@task(retries=2, retry_delay_seconds=10)  # the decision store may sit on a network share
def export_reviewed_parts(review_db: str, out: str) -> int:
    """QA-reviewed line images as a labelled folder, so they are ingested like camera images."""
    from inspection.review import ReviewConfig, run_review_export

    return run_review_export(ReviewConfig(store=review_db), Path(out)).n_written


@task(retries=2, retry_delay_seconds=10)
def apply_labels(review_db: str, store: str) -> int:
    """QA labels take precedence over folder labels (also for images ingested earlier from the camera)."""
    from inspection.review.queries import reviewed_labels

    labels = [label.for_manifest() for label in reviewed_labels(review_db)]  # with QA's defect type
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
    sources = list(sources)
    reviewed = 0
    if review_db:
        reviewed_dir = str(Path(store).with_name(Path(store).name + "-reviewed"))
        reviewed = export_reviewed_parts(review_db, reviewed_dir)
        if reviewed:
            sources.append(reviewed_dir)
    result = ingest_sources(config, sources, store)
    relabelled = apply_labels(review_db, store) if review_db else 0
    counts = {
        "files_seen": result.n_files,
        "already_known": result.already_known,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        **{f"quarantined:{reason}": n for reason, n in sorted(result.quarantined.items())},
        "near_duplicate_groups": result.groups,
        "images_in_store": result.total_accepted,
        "reviewed_parts_exported": reviewed,
        "labels_changed_by_review": relabelled,
        "parts_labelled_both_ways": len(result.mixed_label_parts),
        "photos_of_parts_labelled_both_ways": sum(sum(c.values()) for c in result.mixed_label_parts.values()),
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
