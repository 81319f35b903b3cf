"""`inspection evaluate RUN_DIR [--data DATA] [--split oof|test|val|train|all] [--out DIR]`: QA's view of a model.

Prints the metrics (accuracy, defect recall, escape and false-reject rates, precision, F1, ROC/PR AUC, confusion
[[tn, fp], [fn, tp]]), the line view with the review band and the rates per photo and per physical part with
95 % intervals as JSON; writes the same JSON and PNG plots to
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
    parser.add_argument(
        "--split",
        default=None,
        choices=("oof", "train", "val", "test", "all"),
        help="which split (default: a cross-fitted run's out-of-fold scores, else test)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/eval_<split>)")
    parser.add_argument("--no-plots", action="store_true", help="metrics only")


def main(args: argparse.Namespace) -> int:
    from inspection.train.evaluate import run_evaluate

    split = args.split or ("oof" if args.data is None and (args.run_dir / "oof_scores.npy").is_file() else "test")
    result = run_evaluate(args.run_dir, args.data, split, args.out, plots=not args.no_plots)
    print(json.dumps(result.to_dict(), indent=2))
    return 0
