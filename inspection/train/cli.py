"""`inspection train --config FILE [--data DATA] [--mode head|partial|full] [--exclude REGISTRY]
[--validation crossfit|split] [--from-scratch] [--weights FILE] [--backbone NAME] [--resume] --out RUN_DIR
[key=value ...]`: fine-tune into a run directory.

Prints a JSON summary (run dir, thresholds, val/test metrics, timing) on stdout; the log is for people.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from inspection.config import load_config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file of TrainConfig fields (configs/train.yaml)"
    )
    parser.add_argument("--data", default=None, help="store folder, manifest.sqlite or def_front/ok_front folder")
    parser.add_argument(
        "--mode",
        choices=("auto", "head", "partial", "full"),
        default=None,
        help="fine-tuning mode; auto picks mode and input size by grouped cross-validation within auto_budget_s",
    )
    parser.add_argument(
        "--exclude",
        default=None,
        help="registry folder (or its golden.json): its golden parts never reach training or calibration",
    )
    parser.add_argument(
        "--validation",
        choices=("crossfit", "split"),
        default=None,
        help="crossfit (default): K folds by part; split: the store's train/val/test (faster, fewer parts)",
    )
    parser.add_argument("--from-scratch", action="store_true", help="random initialisation instead of ImageNet")
    parser.add_argument("--weights", default=None, help="local weights file for --backbone (never downloaded)")
    parser.add_argument("--backbone", default=None, help="timm backbone name (default tf_efficientnet_lite0)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument("--out", required=True, type=Path, help="run directory (created)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=3 augment.noise_p=0"
    )


def main(args: argparse.Namespace) -> int:
    from inspection.train.config import TrainConfig
    from inspection.train.evaluate import part_report_rows
    from inspection.train.trainer import run_train

    overrides = list(args.overrides)
    # flags are spelled out for the common cases; they win over the file, like overrides do
    if args.mode:
        overrides.append(f"mode={args.mode}")
    if args.backbone:
        overrides.append(f"backbone={args.backbone}")
    if args.weights:
        overrides.append(f"weights={args.weights}")
    if args.from_scratch:
        overrides.append("pretrained=false")
    if args.resume:
        overrides.append("resume=true")
    if args.data:
        overrides.append(f"data={args.data}")
    if args.exclude:
        overrides.append(f"exclude={args.exclude}")
    if args.validation:
        overrides.append(f"validation={args.validation}")
    config = load_config(TrainConfig, args.config, overrides)
    result = run_train(config, Path(config.data) if config.data else None, args.out)
    summary = {
        "run_dir": str(result.run_dir),
        "version": result.card.version,
        "mode": config.mode,
        "thresholds": result.card.thresholds.model_dump(),
        "metrics": {k: m.model_dump() for k, m in result.metrics.items()},
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": round(result.train_seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "per_part": {split: part_report_rows(report) for split, report in result.parts.items()},
        "excluded": result.excluded,
    }
    print(json.dumps(summary, indent=2))
    return 0
