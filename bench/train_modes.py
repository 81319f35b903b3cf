"""Benchmark: each fine-tuning mode (head, partial, full) on the real castings, held-out test split.

    nice .venv/bin/python bench/train_modes.py --data bench_out/casting_store --out bench_out/train_modes \
        > bench_out/train_modes.json

`--data` is an ingested store (group-aware split: near-duplicates never straddle train/val/test) or a raw
def_front/ok_front folder. Prints one JSON object: per mode, test accuracy / defect recall / false-reject rate at
the calibrated reject threshold (and accuracy at 0.5), wall time of the training, images/s. Writes each mode's
result to OUT/<mode>.json as soon as it is known (a long run can be read while it goes on).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.config import load_config  # noqa: E402
from inspection.train import TrainConfig, run_train  # noqa: E402
from inspection.train.data import resolve_samples  # noqa: E402

logger = logging.getLogger("bench.train_modes")

MODE_OVERRIDES = {
    "head": {"mode": "head"},
    "partial": {"mode": "partial", "partial_cache": True},
    # full fine-tuning of every layer on images: the CPU budget decides how many epochs it gets
    "full": {"mode": "full", "epochs": 2, "warmup_epochs": 0.3},
}


def subsample(samples: list, split: str, per_class: int | None, seed: int) -> list:
    if per_class is None:
        return [s for s in samples if s.split == split]
    rng = np.random.default_rng(seed)
    out = []
    for label in ("ok", "defect"):
        items = sorted((s for s in samples if s.split == split and s.label == label), key=lambda s: s.sha256)
        out += [items[i] for i in sorted(rng.permutation(len(items))[:per_class])]
    return out


def accuracy_at_half(run_dir: Path) -> float:
    """Test accuracy at a 0.5 score threshold (the classifier's own decision, before escape-rate calibration)."""
    scores = np.load(run_dir / "test_scores.npy")
    labels = np.array([s["label"] == "defect" for s in json.loads((run_dir / "samples.json").read_text())["test"]])
    return float(((scores >= 0.5) == labels).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="ingested store or def_front/ok_front folder")
    parser.add_argument("--out", default="bench_out/train_modes", type=Path)
    parser.add_argument("--config", default=ROOT / "configs" / "train_split_partial.yaml", type=Path)
    parser.add_argument("--modes", default="head,partial,full")
    parser.add_argument("--train-per-class", type=int, default=None, help="subsample train (smoke runs)")
    parser.add_argument("--eval-per-class", type=int, default=None, help="subsample val and test (smoke runs)")
    parser.add_argument("--full-budget-s", type=float, default=900.0, help="wall-time budget of full mode")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep OUT/feature_cache between modes and runs (then train_seconds leaves out the frozen pass)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value for every mode, e.g. input_size=192")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    samples = resolve_samples(Path(args.data), args.out / "store")
    chosen = (
        subsample(samples, "train", args.train_per_class, 0)
        + subsample(samples, "val", args.eval_per_class, 1)
        + subsample(samples, "test", args.eval_per_class, 2)
    )
    base = load_config(TrainConfig, args.config, [*args.overrides, "progress=false"])
    results = {}
    for mode in args.modes.split(","):
        overrides = dict(MODE_OVERRIDES[mode])
        if mode == "full":
            overrides["max_train_seconds"] = args.full_budget_s
        cache = args.out / "feature_cache"
        config = replace(base, **overrides, feature_cache=str(cache))
        # time each mode from a cold cache: the frozen part's pass over the images is part of its cost
        if not args.warm_cache:
            shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        result = run_train(config, chosen, args.out / mode)
        wall = time.perf_counter() - t0
        test = result.metrics["test"]
        scores_note = json.loads((args.out / mode / "metrics.json").read_text())
        row = {
            "mode": mode,
            "test_accuracy": test.accuracy,
            "test_defect_recall": test.defect_recall,
            "test_false_reject_rate": test.false_reject_rate,
            "test_escape_rate": test.escape_rate,
            "test_roc_auc": test.roc_auc,
            "test_confusion": test.confusion,
            "test_accuracy_at_0.5": accuracy_at_half(args.out / mode),
            "thresholds": result.card.thresholds.model_dump(),
            "val_calibration": result.card.calibration["reject"],
            "test_line": scores_note["line"]["test"],
            "train_seconds": round(result.train_seconds, 1),
            "wall_seconds": round(wall, 1),
            "images_per_second": round(result.images_per_second, 1),
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "n": {k: v["n"] for k, v in scores_note["counts"].items()},
            "warm_cache": args.warm_cache,
            "load_average_1min": os.getloadavg()[0],
            "config": {k: getattr(config, k) for k in ("input_size", "trainable_blocks", "epochs", "head_epochs")},
        }
        results[mode] = row
        (args.out / f"{mode}.json").write_text(json.dumps(row, indent=2))
        logger.info("%s: %s", mode, json.dumps(row))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
