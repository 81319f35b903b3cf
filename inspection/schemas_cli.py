"""`inspection schemas export|check`: write or verify data_schemas/*.json from the pydantic contracts."""

from __future__ import annotations

import argparse
import logging

from inspection.errors import InspectionError
from inspection.schemas import export_schemas, stale_schemas

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["export", "check"], help="export: (re)write the files; check: fail if stale")
    parser.add_argument("--out", default="data_schemas", help="folder of the JSON Schema files (default data_schemas)")


def main(args: argparse.Namespace) -> int:
    if args.action == "export":
        for path in export_schemas(args.out):
            logger.info("wrote %s", path)
        return 0
    stale = stale_schemas(args.out)
    if stale:
        raise InspectionError(f"stale schema files in {args.out}: {', '.join(stale)}; run: inspection schemas export")
    logger.info("schemas in %s are up to date", args.out)
    return 0
