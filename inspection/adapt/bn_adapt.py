"""Adaptive batch normalisation: re-estimate BatchNorm running statistics on unlabelled target images.

Only `running_mean`, `running_var` and `num_batches_tracked` of BatchNorm layers change; every weight and every
other buffer stays bit-identical, so the adapted network is the source network seen through target statistics.

Two modes:
- `adabn` (Li et al., 2016): reset the statistics and average the target batch statistics (momentum=None), with
  only the BN layers in train mode. Right when the source model's BN statistics are the source data's.
- `align` (default): our models are trained with BN frozen at the ImageNet statistics (`freeze_bn`), so the head
  learned on features normalised by *ImageNet* statistics, not by the source data's. Plain AdaBN would then move
  even source images off what the head expects. `align` instead maps each BN layer's target input distribution
  onto its source input distribution (per channel mean and std, measured with the source model on source images)
  and folds that affine map into the running statistics. On source images it is the identity; where the BN
  statistics equal the source data's, it reduces to AdaBN.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inspection.adapt.data import iter_input_batches
from inspection.errors import DataError

logger = logging.getLogger(__name__)


def batchnorm_layers(net: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer that tracks running statistics (timm's BatchNormAct2d is a BatchNorm2d)."""
    return {
        name: m
        for name, m in net.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    }


@dataclass(frozen=True)
class BNAdaptStats:
    mode: str
    n_layers: int
    n_images: int
    n_batches: int
    mean_shift: float  # mean over layers of |new - old running mean| / old running std: how far the target moved


class _ChannelStats:
    """Per-channel mean and variance of a layer input, averaged over batches (momentum=None semantics)."""

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        if self.mean is None:
            self.mean, self.var = mean.clone(), var.clone()
        else:
            self.mean += (mean - self.mean) / (self.n + 1)
            self.var += (var - self.var) / (self.n + 1)
        self.n += 1
        return mean, var


def _shape(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.dim() - 2)))


@torch.no_grad()
def source_bn_stats(
    net: nn.Module, images: Sequence[Path | np.ndarray], batch_size: int = 32
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer, the (mean, var) of its input on source images, with the source network in eval mode."""
    was_training = net.training
    net.eval()
    layers = batchnorm_layers(net)
    stats = {name: _ChannelStats() for name in layers}

    def record(s: _ChannelStats, x: torch.Tensor) -> None:
        s.add(x)  # a pre-hook that returns None leaves the input as it is

    hooks = [m.register_forward_pre_hook(lambda _m, a, s=stats[name]: record(s, a[0])) for name, m in layers.items()]
    try:
        for _, x in iter_input_batches(net, images, batch_size):
            net.feature_maps_all(x)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    if not stats or next(iter(stats.values())).n == 0:
        raise DataError("no source image could be read to measure the source BatchNorm statistics")
    return {name: (s.mean, s.var) for name, s in stats.items()}


@torch.no_grad()
def adapt_batchnorm(
    net: nn.Module,
    target: Sequence[Path | np.ndarray],
    batch_size: int = 32,
    mode: str = "adabn",
    source_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> BNAdaptStats:
    """Re-estimate the BN running statistics of `net` in place on `target` (paths or uint8 arrays); no labels.

    `mode="align"` needs `source_stats` from `source_bn_stats` (same network, before adaptation).
    Returns with `net` in eval mode.
    """
    if mode not in ("adabn", "align"):
        raise ValueError(f"mode: got {mode!r}, allowed 'adabn' or 'align'")
    if mode == "align" and source_stats is None:
        raise ValueError("mode 'align' needs source_stats (see source_bn_stats)")
    layers = batchnorm_layers(net)
    if not layers:
        raise DataError("the network has no BatchNorm layer with running statistics: nothing to adapt")
    if mode == "align" and set(layers) != set(source_stats):
        raise ValueError("source_stats were measured on a different network (BN layer names differ)")
    old = {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in layers.items()}
    net.eval()  # dropout and everything else stay in inference behaviour
    target_stats = {name: _ChannelStats() for name in layers}
    hooks = []
    saved_momentum = {}
    if mode == "adabn":
        for m in layers.values():
            saved_momentum[m] = m.momentum
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all target batches
            m.train()  # batch statistics normalise and are accumulated
    else:

        def pre_hook(m: nn.Module, args: tuple[torch.Tensor, ...], name: str) -> tuple[torch.Tensor]:
            (x,) = args
            mean_b, var_b = target_stats[name].add(x)
            mean_s, var_s = source_stats[name]
            # standardise with this target batch, then give it the source layer input's mean and std;
            # the BN layer (eval mode, original statistics) then sees what it saw on source images
            scale = torch.sqrt((var_s + m.eps) / (var_b + m.eps))
            return (((x - _shape(mean_b, x)) * _shape(scale, x) + _shape(mean_s, x)),)

        hooks = [m.register_forward_pre_hook(lambda m, a, n=name: pre_hook(m, a, n)) for name, m in layers.items()]
    n_images = n_batches = 0
    try:
        for idx, x in iter_input_batches(net, target, batch_size):
            net.feature_maps_all(x)
            n_images += len(idx)
            n_batches += 1
    finally:
        for h in hooks:
            h.remove()
        for m, momentum in saved_momentum.items():
            m.momentum = momentum
        net.eval()
    if n_images == 0:
        for name, m in layers.items():  # leave the network as it was
            m.running_mean.copy_(old[name][0])
            m.running_var.copy_(old[name][1])
        raise DataError("no target image could be read: BatchNorm statistics left unchanged")
    if mode == "align":
        for name, m in layers.items():
            mean_t, var_t = target_stats[name].mean, target_stats[name].var
            mean_s, var_s = source_stats[name]
            mean_bn, var_bn = old[name]
            ratio = torch.sqrt((var_t + m.eps) / (var_s + m.eps))  # target std / source std
            # (x - m') / sqrt(v' + eps) == ((x - mean_t) / std_t * std_s + mean_s - mean_bn) / sqrt(var_bn + eps)
            m.running_mean.copy_(mean_t - (mean_s - mean_bn) * ratio)
            m.running_var.copy_(((var_bn + m.eps) * ratio**2 - m.eps).clamp_min(0.0))
            m.num_batches_tracked += n_batches
    shifts = [
        ((m.running_mean - old[name][0]).abs() / torch.sqrt(old[name][1] + m.eps)).mean().item()
        for name, m in layers.items()
    ]
    stats = BNAdaptStats(mode, len(layers), n_images, n_batches, float(np.mean(shifts)))
    logger.info(
        "BN %s: %d layers re-estimated on %d target images (%d batches); mean shift %.3f source std",
        mode,
        stats.n_layers,
        n_images,
        n_batches,
        stats.mean_shift,
    )
    return stats


def adapted_copy(
    net: nn.Module,
    target: Sequence[Path | np.ndarray],
    source: Sequence[Path | np.ndarray] | None = None,
    mode: str = "align",
    batch_size: int = 32,
) -> tuple[nn.Module, BNAdaptStats]:
    """A deep copy of `net` adapted to `target`; `source` images are needed for mode 'align'."""
    if mode == "align" and not source:
        raise ValueError("mode 'align' needs source images")
    stats = source_bn_stats(net, source, batch_size) if mode == "align" else None
    adapted = copy.deepcopy(net)
    info = adapt_batchnorm(adapted, target, batch_size=batch_size, mode=mode, source_stats=stats)
    return adapted, info
