"""Register and serve the Prefect deployments defined in deploy/deployments.yaml (needs PREFECT_API_URL).

Run by `make serve` after it has started a local `prefect server`; SIGTERM stops it without pausing schedules.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

DEFAULT_FILE = Path(__file__).with_name("deployments.yaml")


def load_flow(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_deployments(spec: dict[str, Any], only: list[str] | None = None) -> list[Any]:
    deployments = []
    for name, item in spec["deployments"].items():
        if only and name not in only:
            continue
        flow_obj = load_flow(item["flow"])
        kwargs: dict[str, Any] = {"name": name, "parameters": item.get("parameters") or {}}
        if item.get("cron"):
            kwargs["cron"] = item["cron"]
        deployments.append(flow_obj.to_deployment(**kwargs))
    return deployments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", default=str(DEFAULT_FILE), help="deployments YAML")
    parser.add_argument("--only", nargs="*", help="serve only these deployment names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from prefect import serve

    spec = yaml.safe_load(Path(args.file).read_text())
    deployments = build_deployments(spec, args.only)
    logger.info("serving %d deployments: %s", len(deployments), [d.name for d in deployments])
    serve(*deployments, pause_on_shutdown=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
