"""`inspection ingest SOURCE... --store DIR [--config FILE] [key=value ...]`: ingest camera drop folders.

Prints the counts as one JSON object on stdout (for scripts); the log says the same for people.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from inspection.config import load_config, save_config
from inspection.errors import ConfigError
from inspection.ingest.config import IngestConfig
from inspection.ingest.run import run_ingest

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE|key=value",
        help="drop folders (or files) to ingest, and key=value config overrides "
        "(e.g. seed=1 split_fractions=0.8,0.1,0.1)",
    )
    # `inspection ingest A --store S seed=1` puts positionals on both sides of an option; plain parse_args
    # refuses that, the intermixed parser accepts it
    parser.parse_args = parser.parse_intermixed_args  # type: ignore[method-assign]
    parser.add_argument("--store", required=True, type=Path, help="store folder (created if missing)")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of IngestConfig fields")


def main(args: argparse.Namespace) -> int:
    # sources and overrides share the positional list (argparse cannot interleave two): '=' tells them apart
    sources = [Path(s) for s in args.sources if "=" not in s]
    overrides = [s for s in args.sources if "=" in s]
    if not sources:
        raise ConfigError("no SOURCE folder given (only key=value overrides); pass at least one folder of images")
    config = load_config(IngestConfig, args.config, overrides)
    result = run_ingest(config, sources, args.store)
    save_config(config, args.store / "ingest_config.yaml")
    out = dataclasses.asdict(result)
    out["store"] = str(result.store)
    print(json.dumps(out, indent=2))
    return 0
