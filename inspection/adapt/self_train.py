"""Short fine-tuning after the BatchNorm re-estimation: on confident pseudo-labels, or on a few labelled images.

Only the head and (with `trainable="head_bn"`) the BatchNorm scale/shift learn; the network stays in eval mode
throughout, so the adapted running statistics are used and kept, and dropout is off. With a handful of labelled
images or noisy pseudo-labels, anything larger than that overfits within a few steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inspection.adapt.bn_adapt import batchnorm_layers
from inspection.adapt.data import load_valid, preprocess_images
from inspection.adapt.gap import features_and_scores
from inspection.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitStats:
    n_images: int
    n_defect: int
    epochs: int
    steps: int
    final_loss: float


def trainable_parameters(net: nn.Module, trainable: str) -> list[nn.Parameter]:
    """The parameters fine-tuning may change: the head, plus BN affine parameters for 'head_bn'."""
    if trainable not in ("head", "head_bn"):
        raise ValueError(f"trainable: got {trainable!r}, allowed 'head' or 'head_bn'")
    params = list(net.head.parameters())
    if trainable == "head_bn":
        for m in batchnorm_layers(net).values():
            params += [p for p in (m.weight, m.bias) if p is not None]
    return params


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns: a casting seen from above is the same part at any of these poses."""
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(2)
    k = int(torch.randint(0, 4, (1,), generator=generator).item())
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def fit_on(
    net: nn.Module,
    items: Sequence[Path | np.ndarray],
    targets: Sequence[int],
    epochs: int,
    lr: float,
    trainable: str = "head_bn",
    batch_size: int = 16,
    seed: int = 0,
) -> FitStats:
    """Fine-tune `net` in place on images with 0/1 targets (1 = defect); returns with `net` in eval mode."""
    images, kept = load_valid(items)
    if not images:
        raise DataError("no fine-tuning image could be read")
    y = torch.tensor([float(targets[i]) for i in kept])
    with torch.no_grad():
        x_all = preprocess_images(net, images)  # (N, 3, S, S): decoded once, augmented per step
    params = trainable_parameters(net, trainable)
    requires = {p: p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    pos = float(y.sum())
    # balance the classes: a few labelled images are rarely 50/50, pseudo-labels almost never
    pos_weight = torch.tensor((len(y) - pos) / pos) if 0 < pos < len(y) else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    net.eval()  # BN uses (and keeps) the adapted running statistics; dropout off
    steps, loss_value = 0, float("nan")
    try:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                idx = order[start : start + batch_size]
                x = _augment(x_all[idx], generator)
                logits = net.logits_from_input(x)
                loss = loss_fn(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_value = float(loss.detach())
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        net.eval()
    stats = FitStats(len(y), int(pos), epochs, steps, loss_value)
    logger.info(
        "fine-tuned %s on %d images (%d defect): %d steps, loss %.4f", trainable, len(y), pos, steps, loss_value
    )
    return stats


def pseudo_labels(
    net: nn.Module, items: Sequence[Path | np.ndarray], confidence: float, max_images: int, seed: int = 0
) -> tuple[list[Path | np.ndarray], list[int]]:
    """Confident predictions of `net` as labels, class-balanced: at most as many of each class as the rarer has.

    Balancing matters: after a shift the model is often confidently one-sided, and training on that side only
    would push every score the same way.
    """
    _, probs, kept = features_and_scores(net, items)
    defect = kept[probs >= confidence]
    ok = kept[probs <= 1.0 - confidence]
    per_class = min(len(defect), len(ok), max_images // 2)
    if per_class == 0:
        logger.warning(
            "self-training skipped: %d confident defect and %d confident ok predictions (confidence %.2f)",
            len(defect),
            len(ok),
            confidence,
        )
        return [], []
    rng = np.random.default_rng(seed)
    chosen = [(int(i), 1) for i in rng.choice(defect, per_class, replace=False)]
    chosen += [(int(i), 0) for i in rng.choice(ok, per_class, replace=False)]
    logger.info("pseudo-labels: %d per class (of %d defect, %d ok confident)", per_class, len(defect), len(ok))
    return [items[i] for i, _ in chosen], [t for _, t in chosen]


def self_train(
    net: nn.Module,
    items: Sequence[Path | np.ndarray],
    confidence: float = 0.9,
    epochs: int = 2,
    lr: float = 1e-4,
    max_images: int = 512,
    trainable: str = "head_bn",
    seed: int = 0,
) -> FitStats | None:
    """Self-training on confident, class-balanced pseudo-labels; None when there are too few to use."""
    chosen, targets = pseudo_labels(net, items, confidence, max_images, seed)
    if not chosen:
        return None
    return fit_on(net, chosen, targets, epochs=epochs, lr=lr, trainable=trainable, seed=seed)
