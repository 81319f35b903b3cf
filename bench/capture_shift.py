"""Is a misjudged held-out part a capture shift? Label-free BN alignment on half the held-out photos (prints JSON).

The held-out photos are split at random (not by part: a batch from the line shares its capture conditions) into an
unlabelled adaptation half and an evaluation half. The run's BN statistics are aligned to the source on the first
half (the `adapt` stage's default mode), and the second half is scored before and after, per group of interest:
the part given by --group, the other good parts, the defects and all, at 0.5 and at the run's reject threshold.
For comparison, test-time augmentation without adaptation: the mean score over the 8 rotations by 90 degrees and
flips of each photo, on the whole held-out split.

    nice .venv/bin/python bench/capture_shift.py --run bench_out/train_modes/partial --group g00b282377b94dfe1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspection.adapt.bn_adapt import adapt_batchnorm, source_bn_stats  # noqa: E402
from inspection.adapt.data import subsample  # noqa: E402
from inspection.adapt.gap import features_and_scores  # noqa: E402
from inspection.images import read_image  # noqa: E402
from inspection.train.run_dir import load_run  # noqa: E402


def accuracy(scores: np.ndarray, defect: np.ndarray, threshold: float) -> float:
    return round(float(((scores >= threshold) == defect).mean()), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="source run directory trained on the real images")
    parser.add_argument("--group", required=True, help="near-duplicate group id (the part) to report on")
    parser.add_argument("--source-images", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    run = load_run(args.run)
    net = run.net.eval()
    reject = run.card.thresholds.reject
    held = run.samples["test"]
    groups = np.array([str(s.group_id) for s in held])
    if args.group not in set(groups):
        parser.error(f"group {args.group} is not in the run's test split")
    y = np.array([s.label == "defect" for s in held])
    adapt_half = np.zeros(len(held), bool)
    adapt_half[np.random.default_rng(args.seed).permutation(len(held))[: len(held) // 2]] = True

    source = [s.path for s in subsample(run.samples["train"], args.source_images, args.seed)]
    aligned = copy.deepcopy(net)
    images = [read_image(s.path) for s in held]  # decoded once: aligned on, scored before, after and in 8 views
    unlabelled = [images[i] for i in np.flatnonzero(adapt_half)]
    adapt_batchnorm(aligned, unlabelled, mode="align", source_stats=source_bn_stats(net, source))
    _, before, _ = features_and_scores(net, images)
    _, after, _ = features_and_scores(aligned, images)

    report: dict = {"run": str(args.run), "model": run.card.version, "reject_threshold": reject, "groups": {}}
    subsets = {
        args.group: groups == args.group,
        "other_good": (groups != args.group) & ~y,
        "defect": y,
        "all": np.ones(len(held), bool),
    }
    for name, mask in subsets.items():
        m = mask & ~adapt_half  # scored only on the half the alignment did not see
        report["groups"][name] = {
            "n_eval": int(m.sum()),
            **{
                key: {"before": accuracy(before[m], y[m], t), "after_align": accuracy(after[m], y[m], t)}
                for key, t in (("acc_0.5", 0.5), ("acc_reject_threshold", reject))
            },
        }
    dihedral = [
        features_and_scores(net, [np.ascontiguousarray(np.rot90(im[:, ::-1] if flip else im, k)) for im in images])[1]
        for k in range(4)
        for flip in (False, True)
    ]
    tta = np.mean(dihedral, axis=0)
    report["tta8_whole_split"] = {
        name: {
            "n": int(mask.sum()),
            "acc_0.5": {"single_view": accuracy(before[mask], y[mask], 0.5), "tta8": accuracy(tta[mask], y[mask], 0.5)},
        }
        for name, mask in subsets.items()
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
