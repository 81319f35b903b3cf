"""Benchmark: learning curves with 5, 10, 25, 50, 100 labelled parts per class and all, three seeds each.

    nice .venv/bin/python bench/data_efficiency.py --data bench_out/casting_store --out bench_out/data_efficiency \
        > bench_out/data_efficiency.json

Methods (same held-out test subset for all; accuracy at a 0.5 score threshold, plus ROC-AUC):
  (a) scratch   - same architecture (EfficientNet-Lite0, same input size) from random init, full training with
                  image augmentation, wall-time budget = what (c) took for that size and seed (at least 60 s);
  (b) logreg    - frozen ImageNet features (pooled) + logistic regression, no augmentation;
  (c) head_aug  - our small-data recipe: frozen ImageNet features of the image and of `views` augmented views
                  of it (any rotation, flips, light, blur, noise), linear head trained with AdamW + early stopping;
  (c') ours     - partial fine-tuning (last stage + conv_head) on a cached frozen trunk with the same views and
                  map flips, L2-SP (costlier on a CPU; run it with --methods ...,ours when there is time).
`--split photo` deals the photos to train/val/test at random, ignoring parts (same counts per class and side): the
leaky split under which frozen features + logistic regression come near the figures quoted in the issue; it shows how
much of a learning curve is memory of a part's other photos, not a figure for the line.
Every finished run is appended to OUT/runs.jsonl; `--report-only` rebuilds the table, JSON and PNG from it.
A validation subset (--val-per-class) picks the best epoch and is needed for calibration; it is the same for all.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.config import load_config  # noqa: E402
from inspection.train import TrainConfig, run_train  # noqa: E402
from inspection.train.data import resolve_samples, targets_of  # noqa: E402

logger = logging.getLogger("bench.data_efficiency")

SIZES = ("5", "10", "25", "50", "100", "all")
METHODS = ("logreg", "head_aug", "ours", "scratch")


def subsample(samples: list, split: str, per_class: int | None, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for label in ("ok", "defect"):
        items = sorted((s for s in samples if s.split == split and s.label == label), key=lambda s: s.sha256)
        idx = rng.permutation(len(items)) if per_class is not None else np.arange(len(items))
        out += [items[i] for i in sorted(idx[: per_class or len(items)])]
    return out


def photo_level(samples: list, seed: int = 303) -> list:
    """The same number of photos per class on each side, dealt at random regardless of their part."""
    rng = np.random.default_rng(seed)
    out = []
    for label in ("ok", "defect"):
        items = sorted((s for s in samples if s.label == label and s.split), key=lambda s: s.sha256)
        sides = [s.split for s in items]
        out += [replace(items[i], split=side) for i, side in zip(rng.permutation(len(items)), sides, strict=True)]
    return out


def accuracy_auc(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    return float(((scores >= 0.5) == targets).mean()), float(roc_auc_score(targets, scores))


def test_scores(run_dir: Path) -> np.ndarray:
    """Scores the run stored for its test split (written by the trainer beside the metrics)."""
    return np.load(run_dir / "test_scores.npy")


def run_logreg(base: TrainConfig, train: list, test: list, cache_dir: Path) -> dict:
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from inspection.train.data import common_size
    from inspection.train.trainer import FeatureCache, build_net_for, extract, weights_tag

    net = build_net_for(base).eval()
    size_hw = common_size(train + test)
    key = f"{base.backbone}|{base.input_size}|{weights_tag(base)}|{size_hw[0]}x{size_hw[1]}|pooled"
    cache = FeatureCache(cache_dir, key)  # the same key as head mode: one pass per image across all runs
    t0 = time.perf_counter()
    x_train = extract(net, train, size_hw, torch.device("cpu"), base, cache=cache).numpy()
    x_test = extract(net, test, size_hw, torch.device("cpu"), base, cache=cache).numpy()
    cache.save()
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    clf.fit(x_train, targets_of(train))
    scores = clf.predict_proba(x_test)[:, 1]
    acc, auc = accuracy_auc(scores, targets_of(test))
    return {"accuracy": acc, "roc_auc": auc, "seconds": time.perf_counter() - t0}


def run_trainer(config: TrainConfig, samples: list, out: Path, test: list) -> dict:
    t0 = time.perf_counter()
    result = run_train(config, samples, out)
    seconds = time.perf_counter() - t0
    m = result.metrics["test"]
    acc, auc = accuracy_auc(test_scores(out), targets_of(test))
    return {
        "accuracy": acc,
        "roc_auc": auc,
        "accuracy_calibrated": m.accuracy,
        "recall_calibrated": m.defect_recall,
        "seconds": seconds,
        "epochs_run": result.epochs_run,
    }


def report(rows: list[dict], out: Path) -> dict:
    table: dict[str, dict[str, dict]] = {}
    for method in METHODS:
        for size in SIZES:
            accs = [r["accuracy"] for r in rows if r["method"] == method and r["size"] == size]
            if accs:
                table.setdefault(method, {})[size] = {
                    "mean": float(np.mean(accs)),
                    "std": float(np.std(accs)),
                    "seeds": len(accs),
                }
    lines = ["| method | " + " | ".join(f"{s}/class" if s != "all" else "all" for s in SIZES) + " |"]
    lines.append("|---" * (len(SIZES) + 1) + "|")
    for method, per in table.items():
        cells = [
            f"{per[s]['mean'] * 100:.1f} ± {per[s]['std'] * 100:.1f} ({per[s]['seeds']})" if s in per else "–"
            for s in SIZES
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        xs = {s: i for i, s in enumerate(SIZES)}
        for method, per in table.items():
            sizes = [s for s in SIZES if s in per]
            ax.errorbar(
                [xs[s] for s in sizes],
                [per[s]["mean"] * 100 for s in sizes],
                yerr=[per[s]["std"] * 100 for s in sizes],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_xticks(range(len(SIZES)), [f"{s}" for s in SIZES])
        ax.set(
            xlabel="labelled parts per class", ylabel="test accuracy (%)", title="Data efficiency (mean ± std, 3 seeds)"
        )
        ax.axhline(95, color="grey", lw=0.8, ls="--")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "data_efficiency.png", dpi=120)
        plt.close(fig)
    except Exception as exc:  # the table matters more than the picture
        logger.warning("no plot: %s", exc)
    return {"table": table, "markdown": lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="bench_out/data_efficiency", type=Path)
    parser.add_argument("--config", default=ROOT / "configs" / "train_split_partial.yaml", type=Path)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="logreg,head_aug,scratch")
    parser.add_argument("--views", type=int, default=4, help="augmented views per image for small sets (c)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of ours/scratch on small sets")
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--feature-cache", type=Path, default=Path("bench_out/feature_cache"))
    parser.add_argument("--split", choices=("group", "photo"), default="group", help="photo: the leaky diagnostic")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / "runs.jsonl"
    if not args.report_only:
        samples = resolve_samples(Path(args.data), args.out / "store")
        if args.split == "photo":
            samples = photo_level(samples)
        val = subsample(samples, "val", args.val_per_class, 101)
        test = subsample(samples, "test", args.test_per_class, 202)
        train_parts = {s.group_id for s in samples if s.split == "train"}
        seen = sum(s.group_id in train_parts for s in test)
        logger.info("%s split: %d of %d test photos show a part that has photos in train", args.split, seen, len(test))
        base = load_config(TrainConfig, args.config, [*args.overrides, "progress=false", "plots=false"])
        base = replace(base, feature_cache=str(args.feature_cache))
        done = set()
        if runs_path.is_file():
            done = {(r["method"], r["size"], r["seed"]) for r in map(json.loads, runs_path.read_text().splitlines())}
        for size in args.sizes.split(","):
            per_class = None if size == "all" else int(size)
            for seed in map(int, args.seeds.split(",")):
                train = subsample(samples, "train", per_class, seed)
                chosen = train + val + test
                n = len(train)
                # small sets: more augmented views and epochs; everything at once: the plain cached recipe
                views = args.views if per_class is not None and per_class <= 100 else 0
                small = replace(base, seed=seed, cached_views=views, epochs=args.epochs if per_class else base.epochs)
                small = replace(small, patience=args.epochs if per_class else base.patience)
                small = replace(small, batch_size=min(base.batch_size, max(4, n // 2)))
                budget = 60.0  # (a) gets the wall time (c) needed, at least a minute
                for method in args.methods.split(","):
                    if (method, size, seed) in done:
                        continue
                    run_dir = args.out / "runs" / f"{method}_{size}_{seed}"
                    if method == "logreg":
                        row = run_logreg(base, train, test, args.feature_cache)
                    elif method == "ours":
                        row = run_trainer(replace(small, mode="partial", partial_cache=True), chosen, run_dir, test)
                    elif method == "head_aug":
                        head = replace(small, mode="head", head_epochs=200, lr=3e-3, patience=40)
                        row = run_trainer(head, chosen, run_dir, test)
                        budget = max(60.0, row["seconds"])
                    elif method == "scratch":
                        cfg = replace(
                            small,
                            mode="full",
                            pretrained=False,
                            lr=1e-3,
                            backbone_lr=1e-3,
                            layer_decay=1.0,
                            l2sp=0.0,
                            max_train_seconds=budget,
                        )
                        row = run_trainer(cfg, chosen, run_dir, test)
                    else:
                        raise SystemExit(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
                    row.update({"method": method, "size": size, "seed": seed, "n_train": n, "split": args.split})
                    with runs_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    logger.info("%s", json.dumps(row))
    rows = [json.loads(line) for line in runs_path.read_text().splitlines()] if runs_path.is_file() else []
    summary = report(rows, args.out)
    summary["runs"] = len(rows)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
