"""`inspection synth --out DIR --n N --seed S [--part impeller|tile]`: render built-in demo parts in the
def_front/ok_front layout (the ingest stage's default label map, as the real photos use)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from inspection.errors import ConfigError
from inspection.synth import render_dataset

logger = logging.getLogger(__name__)

PARTS = ("impeller", "tile")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder to write def_front/ and ok_front/ into")
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="impeller",
        help="impeller: cast impellers, 300x300 like the line (default); tile: flat ferrite-like tiles, "
        "non-square, 120-630 px wide, several photos per tile",
    )
    parser.add_argument("--n", type=int, default=200, help="number of parts (default 200; tiles: physical tiles)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--defect-fraction", type=float, default=0.5, help="share of defective parts (default 0.5)")
    parser.add_argument("--size", type=int, default=None, help="impeller image side in pixels (default 300)")
    parser.add_argument("--shots", type=int, default=None, help="tile: photos per tile (default 3)")


def main(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise ConfigError(f"--n must be ≥ 0, got {args.n}")
    if not 0.0 <= args.defect_fraction <= 1.0:
        raise ConfigError(f"--defect-fraction must be in [0, 1], got {args.defect_fraction}")
    if args.part == "tile":
        from inspection.synth_tile import SHOTS, render_tile_dataset

        if args.size is not None:
            raise ConfigError("--size applies to --part impeller; tiles come in varied sizes (120-630 px wide)")
        shots = SHOTS if args.shots is None else args.shots
        if shots < 1:
            raise ConfigError(f"--shots must be ≥ 1, got {shots}")
        counts = render_tile_dataset(args.out, args.n, args.seed, args.defect_fraction, shots)
        print(json.dumps({"out": str(args.out), "part": "tile", "tiles": args.n, "shots": shots, **counts}))
        return 0
    if args.shots is not None:
        raise ConfigError("--shots applies to --part tile; each demo casting is photographed once")
    size = 300 if args.size is None else args.size
    if size < 64:
        raise ConfigError(f"--size must be ≥ 64 pixels, got {size}")
    counts = render_dataset(args.out, args.n, args.seed, args.defect_fraction, size)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0
