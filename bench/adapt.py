"""Benchmark of domain adaptation on shifted real images (prints JSON).

Held-out = the test split of the source run (group-aware split from ingest), cut by near-duplicate group into
an adaptation half A (unlabelled; 10 labelled images drawn from it, one per part) and an evaluation half B. Each
shift (night shift: darker + noise; worse lens: blur + contrast loss; new lamp: gamma) is applied to both halves at 3
strengths.
For each: accuracy and defect recall on B of the source model, of the BN-adapted model (no labels; modes align
and adabn), of the aligned model after a short self-training pass on its confident pseudo-labels (no labels), and of
the aligned model fine-tuned on 10 labelled target images; the domain-gap score before/after and whether it warns
(warning level calibrated on halves of the training images split by part). The gap is also given between two random
halves of the held-out photos, between the group-disjoint halves A and B, and between training and held-out photos.

    nice .venv/bin/python bench/adapt.py --run RUN_DIR --out bench_out/adapt.json [--max-images 600]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from inspection.adapt.bn_adapt import adapt_batchnorm, source_bn_stats
from inspection.adapt.config import GapConfig
from inspection.adapt.data import load_valid, subsample
from inspection.adapt.gap import domain_gap, features_and_scores
from inspection.adapt.self_train import fit_on, self_train
from inspection.train import load_run

logger = logging.getLogger("bench.adapt")


def night(im: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Night shift: less light (x0.8, 0.6, 0.4) and more sensor noise (std 4, 8, 12 grey levels)."""
    x = im.astype(np.float32) * (1.0 - 0.2 * s) + rng.normal(0.0, 4.0 * s, im.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def lens(im: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """Worse lens: defocus blur (sigma 1, 2, 3 px at 300 px) and contrast loss (x0.8, 0.6, 0.4 around the mean)."""
    x = cv2.GaussianBlur(im, (0, 0), sigmaX=1.0 * s).astype(np.float32)
    mean = x.mean()
    return np.clip((x - mean) * (1.0 - 0.2 * s) + mean, 0, 255).astype(np.uint8)


def lamp(im: np.ndarray, s: int, rng: np.random.Generator) -> np.ndarray:
    """New lamp / camera response: gamma 1.4, 1.8, 2.2 (darker mid-tones, same black and white points)."""
    g = 1.0 + 0.4 * s
    return (255.0 * (im.astype(np.float32) / 255.0) ** g).round().astype(np.uint8)


SHIFTS = {"night": night, "lens": lens, "lamp": lamp}


def metrics(probs: np.ndarray, y: np.ndarray, reject: float) -> dict[str, float]:
    out = {}
    for name, thr in (("", 0.5), ("_card", reject)):
        pred = probs >= thr
        out[f"acc{name}"] = float((pred == y).mean())
        out[f"recall{name}"] = float(pred[y == 1].mean()) if (y == 1).any() else float("nan")
    return out


def split_by_group(samples: list, seed: int) -> tuple[list, list]:
    groups = sorted({s.group_id for s in samples})
    rng = np.random.default_rng(seed)
    a = set(rng.permutation(groups)[: len(groups) // 2].tolist())
    return [s for s in samples if s.group_id in a], [s for s in samples if s.group_id not in a]


def labelled_parts(samples: list, y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of `n` photos to label, half defect and half good, one photo per part (near-duplicate group) as long
    as there are parts left: QA labels 10 parts, not 10 photos of the 1 part that dominates a folder."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label, k in ((1, n // 2), (0, n - n // 2)):
        by_part: dict[str, list[int]] = {}
        for i in np.flatnonzero(y == label):
            by_part.setdefault(str(samples[i].group_id), []).append(int(i))
        pools = [rng.permutation(by_part[g]).tolist() for g in rng.permutation(sorted(by_part))]
        picked: list[int] = []
        while len(picked) < k and any(pools):
            for pool in pools:  # round robin over parts: a second photo of a part only when every part gave one
                if pool and len(picked) < k:
                    picked.append(pool.pop())
        chosen += picked
    return np.array(chosen)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="source run directory trained on the real images")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--max-images", type=int, default=0, help="use at most N held-out images (0 = all)")
    parser.add_argument("--source-images", type=int, default=400)
    parser.add_argument("--labelled", type=int, default=10)
    parser.add_argument("--labelled-epochs", type=int, default=30)
    parser.add_argument("--shifts", default="night,lens,lamp")
    parser.add_argument("--strengths", default="1,2,3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    run = load_run(args.run)
    net = run.net.eval()
    reject = run.card.thresholds.reject
    held = run.samples["test"]
    if args.max_images:
        held = subsample(held, args.max_images, args.seed)
    half_a, half_b = split_by_group(held, args.seed)
    img_a, _ = load_valid([s.path for s in half_a])
    img_b, _ = load_valid([s.path for s in half_b])
    y_a = np.array([1 if s.label == "defect" else 0 for s in half_a])
    y_b = np.array([1 if s.label == "defect" else 0 for s in half_b])
    labelled_idx = labelled_parts(half_a, y_a, args.labelled, args.seed)
    source_samples = subsample(run.samples["train"], args.source_images, args.seed)
    source_paths = [s.path for s in source_samples]
    groups = [str(s.group_id) for s in source_samples]  # the gap's noise floor halves the source by part
    logger.info("held-out A %d / B %d images; %d source images", len(img_a), len(img_b), len(source_paths))

    gap_config = GapConfig()
    fs, _, _ = features_and_scores(net, source_paths)
    src_stats = source_bn_stats(net, source_paths)
    fa_clean, _, _ = features_and_scores(net, img_a)
    fb_clean, p_clean, _ = features_and_scores(net, img_b)
    clean = metrics(p_clean, y_b, reject)
    # two random halves of the held-out photos (the check), and the two group-disjoint halves A / B
    f_all = np.concatenate([fa_clean, fb_clean])
    g_all = [str(s.group_id) for s in (*half_a, *half_b)]
    perm = np.random.default_rng(args.seed).permutation(len(f_all))
    h1, h2 = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    same_random = domain_gap(f_all[h1], f_all[h2], gap_config, [g_all[i] for i in h1])
    same = domain_gap(fa_clean, fb_clean, gap_config, [str(s.group_id) for s in half_a])
    same_src = domain_gap(fs, fa_clean, gap_config, groups)  # training images vs held-out images
    report: dict = {
        "run": str(args.run),
        "model": run.card.version,
        "mode": run.card.mode,
        "reject_threshold": reject,
        "n_adapt": len(img_a),
        "n_eval": len(img_b),
        "n_labelled": int(args.labelled),
        "clean": clean,
        "gap_random_halves": same_random.to_dict(),
        "gap_same_domain_halves": same.to_dict(),
        "gap_train_vs_heldout": same_src.to_dict(),
        "shifts": {},
    }
    logger.info("clean: %s; gap between halves %.4f (noise %.4f)", clean, same.score, same.noise_floor)
    for shift_name in args.shifts.split(","):
        fn = SHIFTS[shift_name]
        rows = []
        for s in [int(v) for v in args.strengths.split(",")]:
            t = time.perf_counter()
            ra, rb = np.random.default_rng(100 + s), np.random.default_rng(200 + s)
            ta = [fn(im, s, ra) for im in img_a]
            tb = [fn(im, s, rb) for im in img_b]
            ft_a, _, _ = features_and_scores(net, ta)
            _, p_src, _ = features_and_scores(net, tb)
            gap = domain_gap(fs, ft_a, gap_config, groups)
            row = {
                "strength": s,
                "source": metrics(p_src, y_b, reject),
                "gap_before": gap.score,
                "gap_warning": gap.warning,
            }
            for mode in ("align", "adabn"):
                adapted = copy.deepcopy(net)
                adapt_batchnorm(adapted, ta, mode=mode, source_stats=src_stats if mode == "align" else None)
                fa_ad, _, _ = features_and_scores(adapted, ta)
                _, p_ad, _ = features_and_scores(adapted, tb)
                row[f"bn_{mode}"] = metrics(p_ad, y_b, reject)
                row[f"gap_after_{mode}"] = domain_gap(fs, fa_ad, gap_config, groups).score
                if mode == "align":
                    # label-free too: a short self-training pass on confident, class-balanced pseudo-labels
                    st = copy.deepcopy(adapted)
                    stats = self_train(st, ta, seed=args.seed)
                    _, p_st, _ = features_and_scores(st, tb)
                    row["align_self_train"] = metrics(p_st, y_b, reject)
                    row["align_self_train"]["pseudo_labelled"] = stats.n_images if stats else 0
                    del st
                    fit_on(
                        adapted,
                        [ta[i] for i in labelled_idx],
                        y_a[labelled_idx].tolist(),
                        args.labelled_epochs,
                        3e-4,
                        seed=args.seed,
                    )
                    _, p_lab, _ = features_and_scores(adapted, tb)
                    row["align_plus_10_labelled"] = metrics(p_lab, y_b, reject)
            # in whole images, so that "half" is exact (2 of 4 lost images is 0.5, not 0.4999...)
            n_b = len(y_b)
            src_right = round(row["source"]["acc"] * n_b)
            lost = round(clean["acc"] * n_b) - src_right
            for key in ("bn_align", "bn_adabn", "align_self_train", "align_plus_10_labelled"):
                regained = round(row[key]["acc"] * n_b) - src_right
                row[key]["recovered"] = regained / lost if lost > 0 else None
            row["seconds"] = round(time.perf_counter() - t, 1)
            logger.info("%s %d: %s", shift_name, s, json.dumps(row))
            rows.append(row)
        gaps = [r["gap_before"] for r in rows]
        report["shifts"][shift_name] = {
            "rows": rows,
            "gap_monotonic": bool(all(a < b for a, b in zip([same_src.score, *gaps], gaps, strict=False))),
        }

    def recovered(key: str) -> list[float]:
        rows = [r for v in report["shifts"].values() for r in v["rows"]]
        return [r[key]["recovered"] for r in rows if r[key]["recovered"] is not None]

    recov, recov_st = recovered("bn_align"), recovered("align_self_train")
    report["summary"] = {
        "median_recovered_no_labels": float(np.median(recov)) if recov else None,
        "shifts_with_half_recovered_no_labels": f"{sum(r >= 0.5 for r in recov)}/{len(recov)}",
        "median_recovered_align_self_train": float(np.median(recov_st)) if recov_st else None,
        "shifts_with_half_recovered_align_self_train": f"{sum(r >= 0.5 for r in recov_st)}/{len(recov_st)}",
        "gap_monotonic_all": all(v["gap_monotonic"] for v in report["shifts"].values()),
        "gap_random_halves": same_random.score,
        "gap_random_halves_warning": same_random.warning,
        "gap_group_halves": same.score,
        "gap_group_halves_warning": same.warning,
        "gap_train_vs_heldout": same_src.score,
        "gap_train_vs_heldout_warning": same_src.warning,
        "gap_warn_level": same_src.warn_level,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
