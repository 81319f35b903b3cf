"""`mode: auto`: pick the transfer-learning mode and the input size by grouped cross-validation on the data at
hand, within a wall-time budget, and say why (RUN_DIR/auto.json).

Candidates, cheapest first: a linear head on the frozen backbone (one frozen pass, seconds per fold) at the
backbone's native size and at the camera's resolution (for non-square photos also with the other of squash /
letterbox); the multiple-instance head (log-sum-exp of the heatmap cells) at the better head's input, when its
cached grid fits `max_cache_gb`; then the last two stages and the last stage fine-tuned on cached trunk
activations (`partial`) at the best head's input, preprocessing and pooling, each fold early-stopping within
`auto_max_epochs`. Every candidate is cross-fitted on the same folds (whole parts, label-stratified); each is
estimated before it runs and skipped when it would not fit in what is left of the budget (the final fit of the
winner included). The winner has the lowest out-of-fold false-reject rate at the target escape rate (or at
MIN_ESCAPES defect photos when the target allows fewer), then the highest ROC-AUC, then the smaller input (a
cheaper model on the line); its folds are kept, so only its final fit is added. On the real castings the head on
tapped stages at 300 px wins (frozen ImageNet features read the defects well and the head costs seconds); on the
synthetic tiles, whose small defects sit on a textured surface, the multiple-instance head and fine-tuning
through it gain most.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspection.errors import ConfigError
from inspection.preprocess import preprocess_for
from inspection.train.config import TrainConfig
from inspection.train.crossfit import part_folds
from inspection.train.data import image_size, targets_of
from inspection.train.fitting import CrossFitter, Fitted
from inspection.train.loop import apply_freeze, build_net_for
from inspection.train.mil import grid_cache_problem

logger = logging.getLogger(__name__)

AUTO_FILE = "auto.json"
# Candidates are ranked at an escape rate that at least this many defect photos may take: at 0.5 % of 360 defect
# photos (the synthetic tiles) the target's threshold is the lowest or second-lowest defect score, and one
# invisible defect would decide between recipes whose ROC-AUC differ by 0.03
MIN_ESCAPES = 5


@dataclass
class Candidate:
    name: str
    mode: str
    input_size: int
    resize: str = "squash"
    pooling: str = "mean"  # head: average-pooled maps, or the multiple-instance head (lse)
    trainable_blocks: int | None = None  # partial: None = the config's
    epochs: int | None = None  # partial: the cap (auto_max_epochs); each fold early-stops within it
    final_epochs: int | None = None  # partial: the folds' median early-stop epoch, the final fit's schedule
    estimated_s: float | None = None
    seconds: float | None = None
    oof_auc: float | None = None
    frr_at_target: float | None = None  # out-of-fold false-reject rate at the target escape rate
    frr_at_selection: float | None = None  # the same at the selection's escape rate (what the candidates are ranked by)
    status: str = "pending"  # chosen | evaluated | skipped
    reason: str = ""


@dataclass
class AutoReport:
    budget_s: float
    target_escape_rate: float
    selection_escape_rate: float  # the target, or MIN_ESCAPES / defect photos when the target rests on fewer
    camera_size: int
    candidates: list[Candidate] = field(default_factory=list)
    chosen: str | None = None
    why: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "candidates"},
            "candidates": [asdict(c) for c in self.candidates],
        }


def camera_size(samples: Sequence[Any], native: int, limit: int = 448) -> int:
    """The resolution the photos carry: median long side (to a multiple of 4), between native and `limit`."""
    step = max(1, len(samples) // 500)
    sides = [max(image_size(s.path)) for s in list(samples)[::step]]
    size = int(4 * round(float(np.median(sides)) / 4))
    return int(min(max(size, native), limit))


def aspect(samples: Sequence[Any]) -> float:
    """Median width / height of the photos (1.0: square frames, as the impeller camera's)."""
    step = max(1, len(samples) // 500)
    ratios = [w / h for h, w in (image_size(s.path) for s in list(samples)[::step])]
    return float(np.median(ratios))


def frr_at_escape(logits: np.ndarray, targets: np.ndarray, escape: float) -> float:
    defect = np.sort(logits[targets == 1])
    t = defect[min(int(math.floor(escape * len(defect) + 1e-9)), len(defect) - 1)]
    return float((logits[targets == 0] >= t).mean())


def _auc(logits: np.ndarray, targets: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(targets, logits))


def _step_seconds(fitter: CrossFitter, batch: int = 32, steps: int = 5) -> float:
    """Seconds per training row of a cached-partial fit, from a few real steps on random rows of its layout."""
    from inspection.train.fitting import RowModel
    from inspection.train.frozen import split_point, trunk_layout

    net, config = fitter.net, fitter.config
    layout = trunk_layout(net, split_point(net, config), fitter.size_hw)
    model = RowModel(net, layout, fitter.device)
    c, h, w = layout.shape
    rows = torch.randn(batch, c * h * w + layout.n_pooled)
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # the first step warms the allocator up
        loss = model.logits(rows).sum()
        loss.backward()
        for p in params:
            p.grad = None
    net.load_state_dict(fitter.initial)
    net.eval()
    return (time.perf_counter() - t0) / (steps * batch)


def _name(cand: Candidate) -> str:
    blocks = f"-{cand.trainable_blocks}stages" if cand.trainable_blocks else ""
    return f"{cand.mode}-{cand.input_size}{'-' + cand.resize if cand.resize != 'squash' else ''}" + (
        f"{'-lse' if cand.pooling == 'lse' else ''}{blocks}"
    )


def run_auto(
    config: TrainConfig, pool: Sequence[Any], device: torch.device, out: Path, generator: torch.Generator
) -> tuple[Fitted, TrainConfig, Any, AutoReport]:
    """Cross-fit the candidates within `config.auto_budget_s`; the winner's final fit. Returns (fitted, the
    winner's config, its network, the report), and writes the report to `out/auto.json`."""
    import json

    if config.validation != "crossfit":
        raise ConfigError("mode auto compares candidates by cross-fitting: set validation: crossfit")
    t_start = time.perf_counter()
    pool = list(pool)
    targets = targets_of(pool)
    folds = part_folds(targets, [s.group_id for s in pool], config.folds, config.seed)
    native = preprocess_for(config.backbone).input_size
    cam = camera_size(pool, native, config.auto_max_size)
    from inspection.train.data import loader_preprocess, loader_size

    sizes = sorted({native, cam})
    resize = config.resize
    plan = [Candidate("head", "head", s, resize) for s in sizes if "head" in config.auto_modes]
    square = abs(np.log(aspect(pool))) < 0.05
    if not square and "head" in config.auto_modes:  # non-square photos: keep the aspect, or squash to the square?
        other = "letterbox" if resize == "squash" else "squash"
        plan.append(Candidate("head", "head", cam, other))
    if "head" in config.auto_modes:  # small local defects: the multiple-instance head, at the best head's input
        plan.append(Candidate("head-lse", "head", cam, resize, pooling="lse"))
    if "partial" in config.auto_modes:  # at the best head's input and pooling (named when they are known)
        if config.trainable_blocks < 2:  # small defects often need the last two stages (demo castings: 0.968 -> 0.995)
            plan.append(Candidate("partial-2stages", "partial", cam, resize, trainable_blocks=2))
        plan.append(Candidate("partial", "partial", cam, resize))
    n_defect = int(targets.sum())
    selection = max(config.target_escape_rate, MIN_ESCAPES / max(n_defect, 1))
    report = AutoReport(config.auto_budget_s, config.target_escape_rate, selection, cam, plan)
    best: tuple[tuple[float, float, int], Candidate, CrossFitter, TrainConfig] | None = None
    px_rate: float | None = None  # frozen-pass seconds per image per input pixel, from the candidates run so far
    n = len(pool)
    for cand in plan:
        if cand.mode == "partial" and best is not None:
            # fine-tune what the heads found better: their input size, preprocessing and pooling
            cand.input_size, cand.resize, cand.pooling = best[3].input_size, best[3].resize, best[3].head_pooling
        if cand.pooling == "lse" and cand.mode == "head" and best is not None:
            cand.input_size, cand.resize = best[3].input_size, best[3].resize
        cand.name = _name(cand)
        cfg = replace(config, mode=cand.mode, input_size=cand.input_size, resize=cand.resize, head_pooling=cand.pooling)
        if cand.mode == "partial":  # the epoch budget is the folds' early stop within auto_max_epochs
            cand.epochs = config.auto_max_epochs
            blocks = cand.trainable_blocks or cfg.trainable_blocks
            cfg = replace(cfg, partial_cache=True, trainable_blocks=blocks, epochs=cand.epochs)
        net = build_net_for(cfg).to(device)
        if cand.mode == "head" and cand.pooling == "lse" and (why := grid_cache_problem(net, n, config.max_cache_gb)):
            cand.status = "skipped"
            cand.reason = why
            logger.info("auto: %s skipped (%s)", cand.name, cand.reason)
            del net
            continue
        apply_freeze(net, cfg)
        size_hw = loader_size(pool, loader_preprocess(cfg))  # letterbox: each candidate's own square input
        fitter = CrossFitter(net, cfg, pool, size_hw, device, folds=folds)
        elapsed = time.perf_counter() - t_start
        views = 1 + (cfg.cached_views if cfg.augment.enabled else 0)
        if px_rate is not None:
            frozen = px_rate * cand.input_size**2 * n * views
            train = final = 0.0
            if cand.mode == "partial":
                k = int(fitter.folds.max()) + 1
                per_row = cfg.epochs * views * _step_seconds(fitter)
                train = k * n * (k - 1) / k * 0.85 * per_row  # each fold trains on 85 % of the other folds' parts
                final = n * per_row  # the winner's final fit, on everything, comes on top
            cand.estimated_s = float(frozen + train)
            if elapsed + cand.estimated_s + final > config.auto_budget_s:
                cand.status = "skipped"
                cand.reason = (
                    f"estimated {cand.estimated_s:.0f} s; {config.auto_budget_s - elapsed:.0f} s of the "
                    f"{config.auto_budget_s:.0f} s budget left"
                )
                logger.info("auto: %s skipped (%s)", cand.name, cand.reason)
                continue
        t0 = time.perf_counter()
        cf = fitter.run_folds()
        cand.seconds = time.perf_counter() - t0
        if fitter.ff is not None and fitter.ff.seconds > 0 and fitter.ff.engine != "cache":
            px_rate = fitter.ff.seconds / (n * cand.input_size**2 * (1 + len(fitter.views)))
        cand.oof_auc = _auc(cf.oof_logits, targets)
        cand.frr_at_target = frr_at_escape(cf.oof_logits, targets, config.target_escape_rate)
        cand.frr_at_selection = frr_at_escape(cf.oof_logits, targets, selection)
        cand.final_epochs = cf.final_epochs() if cand.mode == "partial" else None
        cand.status = "evaluated"
        logger.info(
            "auto: %s: out-of-fold AUC %.4f, false-reject rate %.4f at %.2f %% escapes, %.0f s",
            cand.name,
            cand.oof_auc,
            cand.frr_at_target,
            100 * config.target_escape_rate,
            cand.seconds,
        )
        key = (cand.frr_at_selection, -cand.oof_auc, cand.input_size)
        if best is None or key < best[0]:
            best = (key, cand, fitter, cfg)
        else:
            del fitter, net  # only the winner's cached rows are kept
    assert best is not None  # the first candidate always runs
    _, chosen, fitter, cfg = best
    chosen.status = "chosen"
    others = [c for c in plan if c.status == "evaluated"]
    report.chosen = chosen.name
    report.why = (
        f"{chosen.name}: lowest out-of-fold false-reject rate at {100 * selection:.2f} % escapes "
        f"({chosen.frr_at_selection:.4f}; AUC {chosen.oof_auc:.4f})"
        + (
            "; others: " + ", ".join(f"{c.name} {c.frr_at_selection:.4f} (AUC {c.oof_auc:.4f})" for c in others)
            if others
            else ""
        )
        + "".join(f"; {c.name} skipped: {c.reason}" for c in plan if c.status == "skipped")
    )
    logger.info("auto: chose %s", report.why)
    fitted = fitter.final_fit(out, generator)
    report.seconds = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / AUTO_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return fitted, cfg, fitter.net, report
