"""Benchmark: grouped k-fold cross-validation of a fine-tuning mode on the real castings (prints JSON).

    nice .venv/bin/python bench/group_cv.py --data bench_out/casting_store --out bench_out/group_cv \
        --modes head,partial > bench_out/group_cv.json

Why: the ok castings of the public set fall into only ~40 near-duplicate groups of very unequal size (up to 303
photos), so one group-aware test split holds a handful of independent good parts and one of them can be half of
its good photos. Here every group is held out exactly once: fold f is the test set, fold f+1 picks the epoch and
calibrates the thresholds, the other folds train. Whole groups move together, label-stratified, balanced by image
count. Reported per mode: pooled out-of-fold accuracy at 0.5 and at each fold's calibrated reject threshold,
defect recall, false-reject rate, ROC-AUC, the per-fold spread, and how many held-out groups were mostly misjudged.
The frozen part's features are cached once per mode and reused by every fold (`train_seconds` of the first fold
includes that pass).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.config import load_config  # noqa: E402
from inspection.train import TrainConfig, run_train  # noqa: E402
from inspection.train.data import make_sample, resolve_samples  # noqa: E402

logger = logging.getLogger("bench.group_cv")


def assign_folds(samples: list, k: int, seed: int) -> dict[str, int]:
    """group_id -> fold: within each label, groups in a seeded order go to the fold furthest below 1/k."""
    sizes: dict[str, int] = Counter(s.group_id for s in samples)
    label_of = {s.group_id: s.label for s in samples}
    folds: dict[str, int] = {}
    for label in sorted({str(v) for v in label_of.values()}):
        groups = sorted(
            (g for g, lab in label_of.items() if str(lab) == label),
            key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest(),
        )
        counts = [0] * k
        for g in sorted(groups, key=lambda g: -sizes[g]):  # big groups first: balance by images
            f = min(range(k), key=lambda i: (counts[i], i))
            folds[g] = f
            counts[f] += sizes[g]
    return folds


def metrics(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    pred = scores >= threshold
    return {
        "accuracy": float((pred == y).mean()),
        "defect_recall": float(pred[y].mean()),
        "false_reject_rate": float(pred[~y].mean()),
    } | ({"roc_auc": float(roc_auc_score(y, scores))} if 0 < y.sum() < len(y) else {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="ingested store (its near-duplicate groups are used)")
    parser.add_argument("--out", default="bench_out/group_cv", type=Path)
    parser.add_argument("--config", default=ROOT / "configs" / "train.yaml", type=Path)
    parser.add_argument("--modes", default="head,partial")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="key=value for every mode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    samples = [s for s in resolve_samples(Path(args.data), args.out / "store") if s.label in ("ok", "defect")]
    fold_of = assign_folds(samples, args.folds, args.seed)
    base = load_config(TrainConfig, args.config, [*args.overrides, "progress=false", "plots=false"])
    report: dict = {
        "data": str(args.data),
        "folds": args.folds,
        "images_per_fold": dict(Counter(fold_of[s.group_id] for s in samples)),
        "groups_per_fold": {
            lab: dict(
                Counter(f for g, f in fold_of.items() if any(s.group_id == g and s.label == lab for s in samples))
            )
            for lab in ("ok", "defect")
        },
        "modes": {},
    }
    for mode in args.modes.split(","):
        config = replace(base, mode=mode, feature_cache=str(args.out / "feature_cache" / mode))
        scores_all, y_all, cal_pred, group_all, fold_rows = [], [], [], [], []
        t_mode = time.perf_counter()
        for f in range(args.folds):
            role = {f: "test", (f + 1) % args.folds: "val"}
            fold_samples = [
                make_sample(s.path, s.sha256, s.label, role.get(fold_of[s.group_id], "train"), s.group_id)
                for s in samples
            ]
            run_dir = args.out / mode / f"fold{f}"
            result = run_train(config, fold_samples, run_dir)
            test_rows = json.loads((run_dir / "samples.json").read_text())["test"]
            scores = np.load(run_dir / "test_scores.npy")
            y = np.array([r["label"] == "defect" for r in test_rows])
            reject = result.card.thresholds.reject
            row = {
                "fold": f,
                "n_test": len(y),
                "at_0.5": metrics(scores, y, 0.5),
                "at_calibrated": metrics(scores, y, reject) | {"threshold": reject},
                "train_seconds": round(result.train_seconds, 1),
            }
            logger.info("%s fold %d: %s", mode, f, json.dumps(row))
            fold_rows.append(row)
            scores_all.append(scores)
            y_all.append(y)
            cal_pred.append(scores >= reject)
            group_all += [r["group_id"] for r in test_rows]
        scores, y, pred = np.concatenate(scores_all), np.concatenate(y_all), np.concatenate(cal_pred)
        wrong_by_group: dict[str, list[bool]] = defaultdict(list)
        for g, yy, pp in zip(group_all, y, pred, strict=True):
            wrong_by_group[g].append(bool(yy != pp))
        label_of_group = {s.group_id: s.label for s in samples}
        mostly_wrong = {
            lab: sum(1 for g, w in wrong_by_group.items() if label_of_group[g] == lab and np.mean(w) > 0.5)
            for lab in ("ok", "defect")
        }
        n_groups = Counter(label_of_group[g] for g in wrong_by_group)
        acc05 = [r["at_0.5"]["accuracy"] for r in fold_rows]
        report["modes"][mode] = {
            "pooled_at_0.5": metrics(scores, y, 0.5),
            "pooled_at_calibrated": {
                "accuracy": float((pred == y).mean()),
                "defect_recall": float(pred[y].mean()),
                "false_reject_rate": float(pred[~y].mean()),
            },
            "fold_accuracy_at_0.5": {"mean": float(np.mean(acc05)), "min": min(acc05), "max": max(acc05)},
            "groups_mostly_misjudged_at_calibrated": {lab: f"{mostly_wrong[lab]}/{n_groups[lab]}" for lab in n_groups},
            "seconds": round(time.perf_counter() - t_mode, 1),
            "folds": fold_rows,
        }
        logger.info("%s: %s", mode, json.dumps({k: v for k, v in report["modes"][mode].items() if k != "folds"}))
    (args.out / "group_cv.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
