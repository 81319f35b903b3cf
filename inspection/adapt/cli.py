"""`inspection adapt RUN_DIR --target FOLDER --out RUN_DIR2 [--labelled FOLDER] [--self-train]`.

Prints the adaptation report (gap before/after, what changed) as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging

from inspection.adapt.config import AdaptConfig
from inspection.config import load_config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the trained run directory to adapt")
    parser.add_argument("--target", required=True, help="folder of unlabelled images of the new domain")
    parser.add_argument("--out", required=True, help="the adapted run directory (created; must not exist or be empty)")
    parser.add_argument(
        "--labelled", help="optional folder with def_front/ok_front subfolders of labelled target images"
    )
    parser.add_argument("--self-train", action="store_true", help="self-train on confident pseudo-labels afterwards")
    parser.add_argument("--config", help="YAML file of AdaptConfig fields (configs/adapt.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. bn_mode=adabn")


def main(args: argparse.Namespace) -> int:
    from inspection.adapt.stage import run_adapt

    overrides = list(args.overrides) + (["self_train=true"] if args.self_train else [])
    config = load_config(AdaptConfig, args.config, overrides)
    result = run_adapt(config, args.run_dir, args.target, args.out, labelled=args.labelled)
    for gap, when in ((result.gap_before, "before"), (result.gap_after, "after")):
        if gap is not None and gap.warning:
            logger.warning("%s adaptation: %s", when, gap.message)
    print(json.dumps(result.to_dict(), indent=2, default=str))
    return 0
