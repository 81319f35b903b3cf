"""`inspection export RUN_DIR [key=value ...] --out DIR [--int8] [--fp16] [--config FILE] [--set key=value]`.

Prints the export result as JSON on stdout (parity figures, INT8 decision and speed-up); exits 1 when a check
fails (nothing is written then).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from inspection.config import load_config
from inspection.errors import ConfigError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # run_dir and the overrides share one positional list (argparse cannot fill two positionals); overrides after
    # `--out` are not positionals any more for argparse, so `--set key=value` works anywhere on the line
    parser.add_argument(
        "run_and_overrides",
        nargs="+",
        metavar="RUN_DIR [key=value ...]",
        help="run directory written by `inspection train`, then ExportConfig overrides, e.g. calibration_images=200",
    )
    parser.add_argument("--out", type=Path, required=True, help="new (or empty) folder for the exported model")
    parser.add_argument("--int8", action="store_true", help="also quantize to INT8 (kept only if it passes the gate)")
    parser.add_argument("--fp16", action="store_true", help="also write a float16 model for GPU providers")
    parser.add_argument("--set", action="append", default=[], metavar="key=value", help="ExportConfig override")
    parser.add_argument("--config", type=Path, default=None, help="ExportConfig YAML file")


def main(args: argparse.Namespace) -> int:
    from inspection.export import ExportConfig, export_onnx

    run_dir, *overrides = args.run_and_overrides
    overrides += args.set
    if "=" in run_dir or any("=" not in o for o in overrides):
        raise ConfigError(
            f"expected RUN_DIR then key=value overrides, got {args.run_and_overrides}; e.g. "
            "inspection export runs/r1 calibration_images=200 --out exports/r1 (or --set key=value)"
        )
    if args.int8:
        overrides.append("int8=true")
    if args.fp16:
        overrides.append("fp16=true")
    config = load_config(ExportConfig, args.config, overrides)
    result = export_onnx(config, Path(run_dir), args.out)
    print(json.dumps(result.to_dict(), indent=2))
    if result.int8 is not None:
        logger.info("%s", result.int8.reason)
    return 0
