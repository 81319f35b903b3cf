"""Benchmark: other readings of the frozen network on a new part type, on one set of grouped folds by part.

    nice .venv/bin/python bench/tile_heads.py --data STORE [--size 224] [--resize squash|letterbox|canvas]
        [--bank 20000] [--mil R ...] [--grid G] [--skip-pooled] [--skip-memory] [--out F.json]

Why it exists: on the synthetic tiles the default recipe (a linear head on average-pooled tapped stages) stays at
OOF ROC-AUC ~0.90, short of the 0.99 target, and a tile's defects are small and local while an average pool
spreads them over the whole frame. Two alternatives that favour small local evidence, each with frozen
ImageNet EfficientNet-Lite0 features of stages 2-6 + the last features, grouped stratified 5-fold CV by part
(scikit-learn's StratifiedGroupKFold, seed 0: the same folds for every reading, not the recipe's own):
- pooled heads: the same L2 logistic regression (standardised, C = 0.01, balanced) on the maps' average, max,
  generalised mean (p = 3) and standard deviation, alone and concatenated;
- a patch memory (PatchCore-like, without the coreset): 3x3-averaged patches of stages 2 and 4 (stage 4
  upsampled to stage 2's grid) from the fold's good training photos, a random `--bank` of them kept; a photo's
  score is its largest patch distance to the nearest kept patch (no labels of defects used).
- with `--mil R [R ...]`, a multiple-instance head: the same linear weights applied at every position of the tapped
  maps brought to one grid (1/16 of the input: the heatmap's grid), pooled by log-sum-exp at temperature R
  (R -> 0 is the average pool, large R the maximum), fitted by Adam on the weighted cross-entropy (150 full-batch
  steps, L2 1e-3): a defect then needs to raise the logit somewhere, not on average. ~8 min per R on 720 photos.
`--resize canvas` puts each photo on a size x size canvas at its own scale (never resized unless larger): the tiles'
native resolution (`--size 640`). `--grid` sets the multiple-instance grid (default size // 16).
Prints one JSON object with OOF ROC-AUC and the false-reject rate at <= 0.5 % escapes per reading; `--out` also
writes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
logger = logging.getLogger("bench.tile_heads")
TAPS = (2, 3, 4, 5, 6)
PATCH_STAGES = (0, 2)  # indices into the tapped maps: stages 2 and 4


def frozen_readings(
    samples, size: int, resize: str, grid_cells: int | None = None
) -> tuple[dict[str, np.ndarray], list, list]:
    """Per photo: pooled readings of every map (avg, max, gem, std), the patch rows for the memory, and every map
    on the heatmap's grid (C, g, g) in half precision for the multiple-instance head."""
    import torch
    from PIL import Image
    from torch.nn import functional as F

    from inspection.models.net import build_net

    canvas = resize == "canvas"
    net = build_net(input_size=size, taps=TAPS, resize="letterbox" if canvas else resize).eval()
    pooled: dict[str, list[np.ndarray]] = {"avg": [], "max": [], "gem": [], "std": []}
    patches, grids = [], []
    cells = grid_cells or max(1, size // 16)
    with torch.no_grad():
        for s in samples:  # one photo at a time: the tiles come in many sizes
            array = np.asarray(Image.open(s.path).convert("RGB"))
            if canvas:  # onto a fixed size x size canvas, scale kept (larger frames would be scaled down)
                h, w = array.shape[:2]
                side = max(h, w, size)
                top, left = (side - h) // 2, (side - w) // 2
                padded = np.full((side, side, 3), 128, np.uint8)
                padded[top : top + h, left : left + w] = array
                array = padded
            image = torch.from_numpy(array.copy())[None]
            maps = net.feature_maps_all(net.preprocess(image))
            pooled["avg"].append(torch.cat([m.mean((2, 3)) for m in maps], 1)[0].numpy())
            pooled["max"].append(torch.cat([m.amax((2, 3)) for m in maps], 1)[0].numpy())
            pooled["std"].append(torch.cat([m.std((2, 3)) for m in maps], 1)[0].numpy())
            gem = [m.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3) for m in maps]
            pooled["gem"].append(torch.cat(gem, 1)[0].numpy())
            grid = maps[PATCH_STAGES[0]].shape[-1]
            local = [F.avg_pool2d(maps[i], 3, 1, 1) for i in PATCH_STAGES]
            local = [m if m.shape[-1] == grid else F.interpolate(m, size=(grid, grid), mode="bilinear") for m in local]
            patches.append(torch.cat(local, 1)[0].flatten(1).T.contiguous().half())  # (grid * grid, C)
            on_grid = [
                F.adaptive_avg_pool2d(m, cells)
                if m.shape[-1] >= cells
                else F.interpolate(m, size=(cells, cells), mode="bilinear")
                for m in maps
            ]
            grids.append(torch.cat(on_grid, 1)[0].half())
    return {k: np.stack(v) for k, v in pooled.items()}, patches, grids


def mil_scores(x_train, y_train, x_test, temperature: float, steps: int = 150, l2: float = 1e-3) -> np.ndarray:
    """Fit the multiple-instance head on (N, C, g, g) maps, score the test maps (log-sum-exp pooled logits)."""
    import math

    import torch
    from torch.nn import functional as F

    x = x_train.float()
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True) + 1e-6
    x = (x - mean) / std
    target = torch.as_tensor(y_train, dtype=torch.float32)
    cell = torch.nn.Conv2d(x.shape[1], 1, 1)
    torch.nn.init.zeros_(cell.weight)
    torch.nn.init.zeros_(cell.bias)
    opt = torch.optim.Adam(cell.parameters(), lr=1e-2)
    pos_weight = (target == 0).sum() / (target == 1).sum()

    def score(maps):
        local = cell(maps).flatten(1)
        return (torch.logsumexp(temperature * local, 1) - math.log(local.shape[1])) / temperature

    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(score(x), target, pos_weight=pos_weight)
        loss = loss + l2 * (cell.weight * cell.weight).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return score((x_test.float() - mean) / std).numpy()


def frr_at_escapes(scores: np.ndarray, y: np.ndarray, escape: float = 0.005) -> float:
    defects = np.sort(scores[y == 1])
    threshold = defects[int(np.floor(escape * len(defects)))]
    return float((scores[y == 0] >= threshold).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="an ingested store (labels and part groups)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--resize", choices=("squash", "letterbox", "canvas"), default="squash")
    parser.add_argument("--grid", type=int, help="cells per side of the multiple-instance grid (size // 16)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-pooled", action="store_true")
    parser.add_argument("--mil-steps", type=int, default=150)
    parser.add_argument("--bank", type=int, default=20000, help="patches kept in the good-part memory")
    parser.add_argument("--mil", type=float, nargs="*", default=[], help="multiple-instance head temperatures")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.preprocessing import StandardScaler

    from inspection.train.data import resolve_samples

    torch.set_num_threads(2)
    torch.manual_seed(0)
    work = Path("bench_out/tile_heads_work")
    samples = [s for s in resolve_samples(args.data, work) if s.label in ("ok", "defect")]
    y = np.array([s.label == "defect" for s in samples], dtype=int)
    groups = np.array([s.group_id for s in samples])
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(np.zeros(len(y)), y, groups))
    t0 = time.perf_counter()
    pooled, patches, grids = frozen_readings(samples, args.size, args.resize, args.grid)
    logger.info("frozen pass %.1f s", time.perf_counter() - t0)
    frozen_s = time.perf_counter() - t0

    def pooled_cv(x: np.ndarray) -> np.ndarray:
        oof = np.zeros(len(y))
        for train, test in folds:
            scaler = StandardScaler().fit(x[train])
            head = LogisticRegression(C=0.01, class_weight="balanced", max_iter=3000)
            head.fit(scaler.transform(x[train]), y[train])
            oof[test] = head.decision_function(scaler.transform(x[test]))
        return oof

    def memory_cv() -> np.ndarray:
        oof = np.zeros(len(y))
        for train, test in folds:
            good = torch.cat([patches[i] for i in train if y[i] == 0]).float()
            bank = good[torch.randperm(len(good))[: args.bank]]
            bank_sq = (bank * bank).sum(1)
            for i in test:
                f = patches[i].float()
                d2 = (f * f).sum(1)[:, None] - 2 * f @ bank.T + bank_sq[None]
                oof[i] = d2.min(1).values.clamp(min=0).sqrt().max().item()
        return oof

    readings = {
        "avg (the recipe)": pooled["avg"],
        "max": pooled["max"],
        "gem": pooled["gem"],
        "avg+max": np.hstack([pooled["avg"], pooled["max"]]),
        "avg+std": np.hstack([pooled["avg"], pooled["std"]]),
        "avg+max+std": np.hstack([pooled["avg"], pooled["max"], pooled["std"]]),
    }

    def figures(oof: np.ndarray) -> dict[str, float]:
        auc = float(roc_auc_score(y, oof))
        return {"oof_roc_auc": round(auc, 4), "frr_at_0.5pct": round(frr_at_escapes(oof, y), 3)}

    rows = {} if args.skip_pooled else {name: figures(pooled_cv(x)) for name, x in readings.items()}
    logger.info("pooled: %s", rows)
    if not args.skip_memory:
        t1 = time.perf_counter()
        memory = figures(memory_cv())
        rows[f"patch memory ({args.bank} good patches)"] = {**memory, "cv_s": round(time.perf_counter() - t1, 1)}
        logger.info("memory: %s", rows)
    maps = torch.stack(grids) if args.mil else None
    for temperature in args.mil:
        t1, oof = time.perf_counter(), np.zeros(len(y))
        for train, test in folds:
            oof[test] = mil_scores(maps[train], y[train], maps[test], temperature, steps=args.mil_steps)
            logger.info("mil fold done %.0f s", time.perf_counter() - t1)
        rows[f"multiple-instance head, log-sum-exp r={temperature:g}"] = {
            **figures(oof),
            "cv_s": round(time.perf_counter() - t1, 1),
        }
    result = {
        "data": str(args.data),
        "photos": len(y),
        "parts": len(set(groups)),
        "size": args.size,
        "resize": args.resize,
        "frozen_pass_s": round(frozen_s, 1),
        "readings": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
