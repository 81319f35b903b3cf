"""`inspection evaluate RUN_DIR [--data DATA] [--split test|val|train|all] [--out DIR]`: QA's view of a model.

Prints the metrics (accuracy, defect recall, escape and false-reject rates, precision, F1, ROC/PR AUC, confusion
[[tn, fp], [fn, tp]]) and the line view with the review band as JSON; writes the same JSON and PNG plots to
RUN_DIR/eval_<split>/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory written by `inspection train`")
    parser.add_argument("--data", default=None, help="other labelled data (store, manifest or image folder)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"), help="which split")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/eval_<split>)")
    parser.add_argument("--no-plots", action="store_true", help="metrics only")


def main(args: argparse.Namespace) -> int:
    from inspection.train.evaluate import run_evaluate

    result = run_evaluate(args.run_dir, args.data, args.split, args.out, plots=not args.no_plots)
    print(json.dumps(result.to_dict(), indent=2))
    return 0
