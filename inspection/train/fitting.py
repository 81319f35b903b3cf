"""How a network is fitted: on cached rows of its frozen part (head / cached partial) or on images, for one
split or cross-fitted over K folds by part. Everything here returns raw logits; calibration and thresholds
are the trainer's.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspection.models import InspectionNet
from inspection.train.config import TrainConfig
from inspection.train.crossfit import CrossFit, FoldReport, check_folds, fold_summary, inner_split, part_folds
from inspection.train.data import make_loader, pos_weight_for, targets_of
from inspection.train.frozen import FrozenFeatures, TrunkLayout, frozen_features, random_d4, tail_logits, tail_pooled
from inspection.train.linear import LinearHead, fit_logistic
from inspection.train.loop import FitState, fit, pooled_features, predict_logits, sigmoid
from inspection.train.mil import MilHead, fit_mil

logger = logging.getLogger(__name__)


@dataclass
class Fitted:
    """A fitted network's raw logits on the samples its thresholds are calibrated on, and on held-out splits."""

    calib_name: str  # "oof" (cross-fitting) or "val" (single split)
    calib_samples: list[Any]
    calib_logits: np.ndarray
    eval_samples: dict[str, list[Any]]  # split -> samples scored by the final model, never trained on
    eval_logits: dict[str, np.ndarray]
    state: FitState  # the final model's fit
    images_seen: int
    frozen_seconds: float = 0.0
    frozen_engine: str = "none"
    crossfit: CrossFit | None = None
    # the head's input features (N, D) of `calib_samples` from the final network (defect types are fitted on them)
    features: Callable[[], np.ndarray] | None = None
    # single split: score the calibration and held-out samples again with the network as it is now (after the
    # calibration was folded into its head), so thresholds sit on the scores the exported model reproduces
    rescore: Callable[[], tuple[np.ndarray, dict[str, np.ndarray]]] | None = None


def _auc(logits: np.ndarray, targets: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(targets, logits)) if 0 < targets.sum() < len(targets) else None


# ---------------------------------------------------------------------------------------------- cached rows
class RowModel:
    """What trains on cached rows: the head (pooled rows) or the partial tail (trunk rows + frozen taps)."""

    def __init__(self, net: InspectionNet, layout: TrunkLayout | None, device: torch.device):
        self.net, self.layout, self.device = net, layout, device

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dim() == 3:  # (N, C, g * g) grid rows of the multiple-instance head
            g = self.net.cam_size()
            return self.net.logits_from_grid(rows.float().view(len(rows), -1, g, g))
        if self.layout is None:
            return self.net.logits_from_pooled(rows)
        x, pooled = self.layout.split(rows)
        return tail_logits(self.net, x, self.layout.k, pooled)

    @torch.no_grad()
    def pooled(self, rows: torch.Tensor) -> np.ndarray:
        """The head's input (N, D) for cached rows: the rows themselves, or the trained tail's pooled output."""
        if rows.dim() == 3:  # grid rows: their mean over the cells, what `InspectionNet.pooled_of` serves
            return torch.cat([rows[i : i + 256].float().mean(2) for i in range(0, len(rows), 256)]).double().numpy()
        if self.layout is None:
            return rows.numpy().astype(np.float64)
        self.net.eval()
        out = []
        for i in range(0, len(rows), 256):
            x, pooled = self.layout.split(rows[i : i + 256].to(self.device))
            out.append(tail_pooled(self.net, x, self.layout.k, pooled).float().cpu())
        return torch.cat(out).numpy().astype(np.float64)

    @torch.no_grad()
    def score(self, rows: torch.Tensor) -> np.ndarray:
        self.net.eval()
        out = [self.logits(rows[i : i + 256].to(self.device)).float().cpu() for i in range(0, len(rows), 256)]
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)

    def augment(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random flips / quarter turns of the cached maps (partial only; pooled rows have no geometry)."""
        if self.layout is None:
            return rows
        x, pooled = self.layout.split(rows)
        if self.layout.grid:  # the frozen taps' grids turn with the trunk's map
            x, pooled = random_d4(x, generator, pooled)  # type: ignore[misc]
            return torch.cat([x.flatten(1), pooled.flatten(1)], dim=1)
        return torch.cat([random_d4(x, generator).flatten(1), pooled], dim=1)  # type: ignore[union-attr]


def _fit_rows(
    model: RowModel,
    config: TrainConfig,
    rows: torch.Tensor,
    views: list[torch.Tensor],
    targets: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    epochs: int,
    out: Path | None,
    generator: torch.Generator,
) -> FitState:
    """The AdamW loop on cached rows of `train_idx` (clean + augmented views), early stopping on `val_idx`."""
    head = model.layout is None
    tr = torch.as_tensor(train_idx)
    x = torch.cat([rows[tr]] + [v[tr] for v in views])
    y = torch.as_tensor(np.tile(targets[train_idx], 1 + len(views)))
    n = len(y)
    steps = max(1, n // config.batch_size) if n > config.batch_size else 1
    flips = config.feature_flips and not head
    pos_weight = pos_weight_for(targets[train_idx]) if config.balance == "pos_weight" else None

    def batches(epoch: int):
        if config.balance == "sampler":
            from inspection.train.data import balanced_sampler

            order = torch.as_tensor(list(balanced_sampler(y.numpy(), generator)))
        else:
            order = torch.randperm(n, generator=generator)
        for i in range(0, steps * config.batch_size if n > config.batch_size else n, config.batch_size):
            idx = order[i : i + config.batch_size]
            xb = x[idx]
            yield (model.augment(xb, generator) if flips else xb), y[idx]

    validate = None
    if val_idx is not None:
        val_rows, val_targets = rows[torch.as_tensor(val_idx)], targets[val_idx]

        def validate():
            return sigmoid(model.score(val_rows)), val_targets

    threads = torch.get_num_threads()
    if head:
        # a linear head on (32, D) batches: each op takes microseconds, and waking a second thread costs more
        torch.set_num_threads(1)
    try:
        state = fit(
            model.net,
            config,
            epochs,
            batches,
            steps,
            model.logits,
            validate,
            pos_weight,
            model.device,
            out,
            save_last_every_epoch=not head,
            generator=generator,
        )
    finally:
        torch.set_num_threads(threads)
    model.net.load_state_dict(state.best_state)
    model.net.eval()
    return state


def _set_head(net: InspectionNet, weight: np.ndarray, bias: float) -> None:
    with torch.no_grad():
        net.head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32)[None])
        net.head.bias.fill_(float(bias))


def _fit_head(
    config: TrainConfig, rows: torch.Tensor, views: list[torch.Tensor], targets: np.ndarray, idx: np.ndarray
) -> LinearHead | MilHead:
    """The head's convex-enough fit on cached rows `idx` (+ their augmented views): L-BFGS logistic regression on
    pooled rows, the multiple-instance fit on grid rows."""
    at = torch.as_tensor(idx)
    y = np.tile(targets[idx], 1 + len(views))
    balanced = config.balance != "none"
    if rows.dim() == 3:
        x = torch.cat([rows[at]] + [v[at] for v in views]) if views else rows[at]
        return fit_mil(x, y, config.pool_temperature, balanced=balanced, seed=config.seed)
    xs = np.concatenate([rows[at].numpy()] + [v[at].numpy() for v in views])
    return fit_logistic(xs, y, config.head_c, balanced=balanced)


def _head_logits(head: LinearHead | MilHead, rows: torch.Tensor, idx: np.ndarray) -> np.ndarray:
    at = torch.as_tensor(idx)
    return head.logits(rows[at]) if isinstance(head, MilHead) else head.logits(rows[at].numpy())


def _cached_features(net, config, samples, size_hw, device, view_samples) -> tuple[FrozenFeatures, RowModel]:
    """One frozen pass over `samples`, plus `cached_views` augmented passes over `view_samples`."""
    ff = frozen_features(net, samples, size_hw, device, config, view_samples=view_samples)
    return ff, RowModel(net, ff.layout, device)


def _lbfgs_state() -> FitState:
    return FitState(epoch=0, best_epoch=0)  # a convex solve: no epochs, no early stop


# ---------------------------------------------------------------------------------------------- single split
def fit_split(net, config: TrainConfig, splits, size_hw, device, out: Path, generator) -> Fitted:
    """Train on the train split, early-stop and calibrate on val, score test (the store's own split)."""
    train, val, test = splits["train"], splits["val"], splits.get("test", [])
    cached = config.mode == "head" or (config.mode == "partial" and config.partial_cache)
    if cached:
        everything = [*train, *val, *test]
        ff, model = _cached_features(net, config, everything, size_hw, device, view_samples=train)
        n_tr, n_val = len(train), len(val)
        targets = targets_of(everything)
        tr, va, te = np.arange(n_tr), np.arange(n_tr, n_tr + n_val), np.arange(n_tr + n_val, len(everything))
        views = ff.views  # augmented rows of the train samples, in the same order (so index tr works on them)
        if config.mode == "head" and config.head_solver == "lbfgs":
            head = _fit_head(config, ff.rows, views, targets, tr)
            _set_head(net, head.weight, head.bias)
            state = _lbfgs_state()
        else:
            state = _fit_rows(model, config, ff.rows, views, targets, tr, va, _epochs(config), out, generator)
        seen = (len(views) + 1) * n_tr

        def rescore_rows() -> tuple[np.ndarray, dict[str, np.ndarray]]:
            val_logits = model.score(ff.rows[torch.as_tensor(va)]) if n_val else np.zeros(0)
            return val_logits, ({"test": model.score(ff.rows[torch.as_tensor(te)])} if test else {})

        return Fitted(
            "val",
            list(val),
            model.score(ff.rows[torch.as_tensor(va)]) if n_val else np.zeros(0),
            {"test": list(test)} if test else {},
            {"test": model.score(ff.rows[torch.as_tensor(te)])} if test else {},
            state,
            images_seen=seen + len(everything),
            frozen_seconds=ff.seconds,
            frozen_engine=ff.engine,
            rescore=rescore_rows,
        )
    state = _fit_images(net, config, train, val, size_hw, device, _epochs(config), out, generator)

    def rescore_images() -> tuple[np.ndarray, dict[str, np.ndarray]]:
        val_logits = predict_logits(net, val, size_hw, 64, device, config)
        return val_logits, ({"test": predict_logits(net, test, size_hw, 64, device, config)} if test else {})

    val_logits, evals = rescore_images()
    held = {"test": list(test)} if test else {}
    return Fitted("val", list(val), val_logits, held, evals, state, state.images_seen, rescore=rescore_images)


def _epochs(config: TrainConfig) -> int:
    return config.head_epochs if config.mode == "head" else config.epochs


def _fit_images(net, config, train, val, size_hw, device, epochs, out, generator) -> FitState:
    """Fine-tuning on decoded, augmented images (uncached partial, full)."""
    loader = make_loader(train, size_hw, config, train=True, generator=generator)
    augment = loader.dataset.augment
    pos_weight = pos_weight_for(targets_of(train)) if config.balance == "pos_weight" else None

    def batches(epoch: int):
        if augment is not None:
            augment.set_random_seed(config.seed * 100_003 + epoch)  # resumable: epoch k always sees the same draws
        return loader

    validate = None
    if val:
        val_targets = targets_of(val)

        def validate():
            return sigmoid(predict_logits(net, val, size_hw, 64, device, config)), val_targets

    state = fit(
        net,
        config,
        epochs,
        batches,
        len(loader),
        net.forward_logits,
        validate,
        pos_weight,
        device,
        out,
        generator=generator,
    )
    net.load_state_dict(state.best_state)
    net.eval()
    return state


# ---------------------------------------------------------------------------------------------- cross-fitting
class CrossFitter:
    """Cross-fitting in two steps, so that `auto` can compare candidates on their folds before paying for a
    final fit: `run_folds()` (out-of-fold logits of every part), then `final_fit()` (the model on every part).

    Cached modes make one frozen pass over the pool (and its augmented views) that serves all folds and the
    final fit. The L-BFGS head needs no schedule; AdamW-trained models early-stop each fold on ~15 % of its
    training parts (never on the fold they score) and the final fit runs the folds' median early-stop epoch.
    """

    def __init__(self, net, config: TrainConfig, pool: Sequence[Any], size_hw, device, folds: np.ndarray | None = None):
        self.net, self.config, self.pool, self.size_hw, self.device = net, config, list(pool), size_hw, device
        self.targets = targets_of(self.pool)
        self.groups = [s.group_id for s in self.pool]
        self.folds = folds if folds is not None else part_folds(self.targets, self.groups, config.folds, config.seed)
        check_folds(self.folds, self.groups)
        self.cached = config.mode == "head" or (config.mode == "partial" and config.partial_cache)
        self.lbfgs = config.mode == "head" and config.head_solver == "lbfgs"
        self.initial = copy.deepcopy({n: v.detach().clone() for n, v in net.state_dict().items()})
        self.ff: FrozenFeatures | None = None
        self.model: RowModel | None = None
        self.views: list[torch.Tensor] = []
        self.crossfit: CrossFit | None = None

    def frozen_pass(self) -> None:
        if self.cached and self.ff is None:
            self.ff, self.model = _cached_features(
                self.net, self.config, self.pool, self.size_hw, self.device, view_samples=self.pool
            )
            self.views = self.ff.views

    def run_folds(self) -> CrossFit:
        config, net, pool, targets, groups, folds = (
            self.config,
            self.net,
            self.pool,
            self.targets,
            self.groups,
            self.folds,
        )
        k = int(folds.max()) + 1
        logger.info("cross-fitting %d folds by part: %s", k, fold_summary(folds, targets, groups))
        self.frozen_pass()
        ff, model, views = self.ff, self.model, self.views
        oof = np.zeros(len(pool))
        reports: list[FoldReport] = []
        for f in range(k):
            t0 = time.perf_counter()
            held = np.flatnonzero(folds == f)
            best_epoch: int | None = None
            fold_gen = torch.Generator().manual_seed(config.seed * 1000 + f)
            if self.lbfgs:
                head = _fit_head(config, ff.rows, views, targets, np.flatnonzero(folds != f))  # type: ignore[union-attr]
                oof[held] = _head_logits(head, ff.rows, held)  # type: ignore[union-attr]
                n_train = int((folds != f).sum())
            else:
                net.load_state_dict(self.initial)
                train_idx, stop_idx = inner_split(folds, f, targets, groups, seed=config.seed)
                n_train = len(train_idx)
                if self.cached:
                    epochs = _epochs(config)
                    st = _fit_rows(model, config, ff.rows, views, targets, train_idx, stop_idx, epochs, None, fold_gen)  # type: ignore[arg-type,union-attr]
                    oof[held] = model.score(ff.rows[torch.as_tensor(held)])  # type: ignore[union-attr]
                else:
                    train_s, stop_s = [pool[i] for i in train_idx], [pool[i] for i in stop_idx]
                    st = _fit_images(
                        net, config, train_s, stop_s, self.size_hw, self.device, config.epochs, None, fold_gen
                    )
                    oof[held] = predict_logits(net, [pool[i] for i in held], self.size_hw, 64, self.device, config)
                best_epoch = st.best_epoch
            reports.append(
                FoldReport(
                    fold=f,
                    n_train=n_train,
                    n_held=len(held),
                    n_parts_held=len({groups[i] for i in held}),
                    best_epoch=best_epoch,
                    seconds=time.perf_counter() - t0,
                    held_auc=_auc(oof[held], targets[held]),
                )
            )
            logger.info(
                "fold %d/%d: %d photos held out, AUC %s, %.1f s%s",
                f + 1,
                k,
                len(held),
                "n/a" if reports[-1].held_auc is None else f"{reports[-1].held_auc:.4f}",
                reports[-1].seconds,
                f", best epoch {best_epoch}" if best_epoch is not None else "",
            )
        self.crossfit = CrossFit(folds=folds, oof_logits=oof, reports=reports)
        return self.crossfit

    def final_fit(self, out: Path, generator) -> Fitted:
        cf = self.crossfit if self.crossfit is not None else self.run_folds()
        config, net, pool, targets = self.config, self.net, self.pool, self.targets
        ff, model, views = self.ff, self.model, self.views
        everything = np.arange(len(pool))
        net.load_state_dict(self.initial)
        if self.lbfgs:
            head = _fit_head(config, ff.rows, views, targets, everything)  # type: ignore[union-attr]
            _set_head(net, head.weight, head.bias)
            state = _lbfgs_state()
        else:
            epochs = max(1, cf.final_epochs() or _epochs(config))
            logger.info("final fit on all %d photos for %d epochs (the folds' median early stop)", len(pool), epochs)
            if self.cached:
                state = _fit_rows(model, config, ff.rows, views, targets, everything, None, epochs, out, generator)  # type: ignore[arg-type,union-attr]
            else:
                state = _fit_images(net, config, pool, [], self.size_hw, self.device, epochs, out, generator)
        seen = (cf.k + 1) * len(pool) * (1 + len(views))

        def features() -> np.ndarray:
            if model is not None and ff is not None:
                return model.pooled(ff.rows)
            return pooled_features(net, pool, self.size_hw, self.device, config)

        return Fitted(
            "oof",
            pool,
            cf.oof_logits,
            {},
            {},
            state,
            images_seen=seen,
            frozen_seconds=ff.seconds if ff else 0.0,
            frozen_engine=ff.engine if ff else "none",
            crossfit=cf,
            features=features,
        )


def fit_crossfit(net, config: TrainConfig, pool: Sequence[Any], size_hw, device, out: Path, generator) -> Fitted:
    """K fold models by part (out-of-fold logits for every part), then the final model on every part."""
    return CrossFitter(net, config, pool, size_hw, device).final_fit(out, generator)
