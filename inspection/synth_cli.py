"""`inspection synth --out DIR --n N --seed S`: render built-in demo castings in the def_front/ok_front layout."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from inspection.errors import ConfigError
from inspection.synth import render_dataset

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to write def_front/ and ok_front/ into")
    parser.add_argument("--n", type=int, default=200, help="number of parts (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--defect-fraction", type=float, default=0.5, help="share of defective parts (default 0.5)")
    parser.add_argument("--size", type=int, default=300, help="image side in pixels (default 300, like the line)")


def main(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise ConfigError(f"--n must be ≥ 0, got {args.n}")
    if not 0.0 <= args.defect_fraction <= 1.0:
        raise ConfigError(f"--defect-fraction must be in [0, 1], got {args.defect_fraction}")
    if args.size < 64:
        raise ConfigError(f"--size must be ≥ 64 pixels, got {args.size}")
    counts = render_dataset(args.out, args.n, args.seed, args.defect_fraction, args.size)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0
