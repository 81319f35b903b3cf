"""`adapt` flow: adapt a run to a new camera/lighting domain (no labels needed); returns the adapted run directory.

Only puts `run_adapt` in a task; the ML lives in `inspection.adapt`. A drift alarm on the line can start it through
a deployment (`inspection.drift.prefect_trigger("adapt/<deployment>")`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from inspection.adapt import AdaptConfig, run_adapt
from inspection.config import load_config


@task
def adapt_run(
    run_dir: str, target: str, out: str, labelled: str | None, config_path: str | None, overrides: list[str]
) -> dict:
    config = load_config(AdaptConfig, config_path, overrides)
    return run_adapt(
        config, Path(run_dir), Path(target), Path(out), labelled=Path(labelled) if labelled else None
    ).to_dict()


@flow(name="adapt")
def adapt_flow(
    run_dir: str,
    target: str,
    out: str,
    labelled: str | None = None,
    self_train: bool = False,
    config: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Adapt `run_dir` to the unlabelled images in `target` into the run directory `out`; returns `out`."""
    logger = get_run_logger()
    report = adapt_run(
        run_dir, target, out, labelled, config, [f"self_train={str(self_train).lower()}", *(overrides or [])]
    )
    lines = [f"# Adapted run {report['version']}", f"parent: {report['parent_version']}", ""]
    for when in ("gap_before", "gap_after"):
        gap = report.get(when)
        if gap:
            lines.append(f"- {when}: {gap['score']:.3f} (warning level {gap['warn_level']:.3f}): {gap['message']}")
            if gap["warning"]:
                logger.warning("%s: %s", when, gap["message"])
    create_markdown_artifact(key="adapt-report", markdown="\n".join(lines), description=f"Adaptation of {run_dir}")
    logger.info("adapted %s -> %s", run_dir, out)
    return out


if __name__ == "__main__":
    import sys

    adapt_flow(run_dir=sys.argv[1], target=sys.argv[2], out=sys.argv[3])
