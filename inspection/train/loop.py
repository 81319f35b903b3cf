"""The training loop and the three transfer-learning modes (what trains, at which learning rate).

- `head`: the backbone is frozen (BatchNorm statistics included: eval mode); only the linear head trains.
- `partial`: the last N backbone stages, conv_head and the head train; earlier stages are frozen, in eval mode.
- `full`: everything trains, with discriminative learning rates (earlier stages slower), warm-up, L2-SP toward the
  pretrained weights and frozen BatchNorm statistics, which guard against catastrophic forgetting.

AdamW, linear warm-up then cosine decay per step, early stopping on the validation metric, the best weights kept,
`last.pt` to resume, seeded. On CUDA: autocast (bf16 where supported, else fp16) and channels-last.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inspection.errors import ConfigError
from inspection.models import InspectionNet, build_net
from inspection.train.config import TrainConfig
from inspection.train.data import ImageDataset
from inspection.train.frozen import _progress

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- set-up
def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def select_device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use auto or cpu")
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def amp_context(device: torch.device, config: TrainConfig):
    """Autocast on CUDA (bf16 where the card supports it, else fp16); a no-op on the CPU."""
    if device.type != "cuda" or not config.amp:
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, config: TrainConfig) -> bool:
    return device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()


def build_net_for(config: TrainConfig) -> InspectionNet:
    return build_net(
        config.backbone,
        pretrained=config.pretrained,
        weights=config.weights,
        input_size=config.input_size,
        resize=config.resize,
        dropout=config.dropout,
        taps=config.taps,
        pooling=config.head_pooling,
        temperature=config.pool_temperature,
    )


# ------------------------------------------------------------------------------------------------------------ modes
def backbone_stages(backbone: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Backbone parts from input to output: stem, each stage of `blocks`, top (conv_head + bn2)."""
    needed = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    missing = [n for n in needed if not hasattr(backbone, n)]
    if missing:
        raise ConfigError(
            f"backbone {type(backbone).__name__} lacks {missing}: modes partial/full (staged learning rates) "
            "need an EfficientNet/MobileNet-style timm backbone; use mode head, or such a backbone"
        )
    stages: list[tuple[str, list[nn.Module]]] = [("stem", [backbone.conv_stem, backbone.bn1])]
    stages += [(f"blocks.{i}", [stage]) for i, stage in enumerate(backbone.blocks)]
    stages.append(("top", [backbone.conv_head, backbone.bn2]))
    return stages


def trainable_backbone_parts(net: InspectionNet, config: TrainConfig) -> list[tuple[str, list[nn.Module]]]:
    if config.mode == "head":
        return []
    stages = backbone_stages(net.backbone)
    if config.mode == "full":
        return stages
    n_blocks = len(stages) - 2
    if config.trainable_blocks > n_blocks:
        raise ConfigError(
            f"trainable_blocks: got {config.trainable_blocks}, but {config.backbone} has {n_blocks} stages; "
            "allowed 1.." + str(n_blocks) + " (or use mode full)"
        )
    return stages[-(config.trainable_blocks + 1) :]


def apply_freeze(net: InspectionNet, config: TrainConfig) -> None:
    """Set requires_grad for the mode: exactly the trained parts (and the head) get gradients."""
    net.backbone.requires_grad_(config.mode == "full")
    for _, modules in trainable_backbone_parts(net, config):
        for m in modules:
            m.requires_grad_(True)
    net.head.requires_grad_(True)


def set_train_mode(net: InspectionNet, config: TrainConfig) -> None:
    """train() for what learns; frozen parts (and, with freeze_bn, all backbone BatchNorms) stay in eval mode."""
    net.train()
    if config.mode == "head":
        net.backbone.eval()
        return
    trained = {id(m) for _, modules in trainable_backbone_parts(net, config) for m in modules}
    for _, modules in backbone_stages(net.backbone):
        for m in modules:
            if id(m) not in trained:
                m.eval()
    if config.freeze_bn and config.pretrained:  # random BN statistics are not worth keeping
        for m in net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def param_groups(net: InspectionNet, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: head at `lr`; backbone stages at `backbone_lr`, decayed toward the input in full mode."""
    groups: list[dict[str, Any]] = [
        {"name": "head", "params": list(net.head.parameters()), "lr": config.lr, "weight_decay": config.weight_decay}
    ]
    parts = trainable_backbone_parts(net, config)
    # With L2-SP the pull goes toward the pretrained weights, not toward zero: no plain decay on the backbone.
    backbone_wd = 0.0 if (config.l2sp > 0 and config.pretrained) else config.weight_decay
    for depth, (name, modules) in enumerate(reversed(parts)):
        decay = config.layer_decay**depth if config.mode == "full" else 1.0
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if params:
            groups.append(
                {"name": name, "params": params, "lr": config.backbone_lr * decay, "weight_decay": backbone_wd}
            )
    return groups


class L2SP:
    """(alpha / 2) * sum ||w - w_pretrained||^2 over the trained backbone weights (Li et al., 2018)."""

    def __init__(self, net: InspectionNet, alpha: float):
        self.alpha = alpha
        self.pairs = [(p, p.detach().clone()) for p in net.backbone.parameters() if p.requires_grad]

    def __call__(self) -> torch.Tensor | float:
        if not self.pairs or self.alpha <= 0:
            return 0.0
        return 0.5 * self.alpha * sum(((p - p0) ** 2).sum() for p, p0 in self.pairs)


def lr_lambda(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `floor` of the base learning rate."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------------------------------- inference
def _eval_loader(
    net: InspectionNet, samples: Sequence[Any], size_hw: tuple[int, int], batch_size: int
) -> torch.utils.data.DataLoader:
    """Samples in order, no augmentation, at the network's own preprocessing."""
    # its own generator: creating a loader iterator draws a seed, which must not shift the training RNG
    return torch.utils.data.DataLoader(
        ImageDataset(samples, size_hw, preprocess=net.preprocess.config),
        batch_size=batch_size,
        shuffle=False,
        generator=torch.Generator(),
    )


@torch.no_grad()
def predict_logits(
    net: InspectionNet,
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    batch_size: int = 64,
    device: torch.device | None = None,
    config: TrainConfig | None = None,
) -> np.ndarray:
    """Defect logits (N,) for `samples`, network in eval mode, no augmentation."""
    device = device or torch.device("cpu")
    was_training = net.training
    net.eval()
    loader = _eval_loader(net, samples, size_hw, batch_size)
    out = []
    ctx = amp_context(device, config) if config is not None else nullcontext()
    for images, _ in loader:
        with ctx:
            logits = net.forward_logits(images.to(device, non_blocking=True))
        out.append(logits.float().cpu())
    net.train(was_training)
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def pooled_features(
    net: InspectionNet, samples: Sequence[Any], size_hw: tuple[int, int], device: torch.device, config: TrainConfig
) -> np.ndarray:
    """The head's input (N, D) for `samples` through the whole network (no augmentation)."""
    net.eval()
    out = []
    for images, _ in _eval_loader(net, samples, size_hw, 64):
        with amp_context(device, config):
            out.append(net.pooled_features(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, sum(net.widths)))


def predict_scores(
    net: InspectionNet,
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    batch_size: int = 64,
    device: torch.device | None = None,
    config: TrainConfig | None = None,
) -> np.ndarray:
    """Defect probabilities (N,) for `samples`, network in eval mode, no augmentation."""
    return sigmoid(predict_logits(net, samples, size_hw, batch_size, device, config))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, dtype=np.float64), -60, 60)))


# -------------------------------------------------------------------------------------------------------- the loop
@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    best_score: float = -math.inf  # higher is better (val loss is negated)
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    images_seen: int = 0
    seconds: float = 0.0


def _monitor_value(config: TrainConfig, val: dict[str, float]) -> float:
    return -val["val_loss"] if config.monitor == "val_loss" else val[config.monitor]


def _val_summary(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    p = np.clip(scores, 1e-7, 1 - 1e-7)
    loss = float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())
    auc = float(roc_auc_score(targets, scores)) if 0 < targets.sum() < len(targets) else float("nan")
    return {"val_loss": loss, "val_auc": auc, "val_accuracy": float(((scores >= 0.5) == targets).mean())}


def fit(
    net: InspectionNet,
    config: TrainConfig,
    epochs: int,
    train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    validate: Callable[[], tuple[np.ndarray, np.ndarray]] | None,
    pos_weight: float | None,
    device: torch.device,
    out: Path | None,
    save_last_every_epoch: bool = True,
    generator: torch.Generator | None = None,
) -> FitState:
    """Train with AdamW + warm-up/cosine; early stopping on `config.monitor`; best weights kept; `last.pt` resume.

    `validate=None` (the final fit of cross-fitting, whose schedule the folds chose): all `epochs` run and the
    last weights are kept. `out=None`: no `last.pt` (fold models are not resumable, they are cheap to redo).
    """
    groups = param_groups(net, config)
    optimizer = torch.optim.AdamW(groups)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, int(round(config.warmup_epochs * steps_per_epoch)))
    )
    criterion = nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor(pos_weight, device=device) if pos_weight is not None else None
    )
    reg = L2SP(net, config.l2sp) if (config.mode != "head" and config.pretrained) else (lambda: 0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, config))
    state = FitState()
    last_path = out / "last.pt" if out is not None else None
    if config.resume and last_path is not None and last_path.is_file():
        state = _load_last(last_path, net, optimizer, scheduler, config, generator)
        logger.info("resumed from %s after epoch %d", last_path, state.epoch)
    patience = config.patience if validate is not None else math.inf
    while state.epoch < epochs and state.bad_epochs < patience:
        if config.max_train_seconds is not None and state.seconds >= config.max_train_seconds:
            logger.info("time budget of %.0f s used after epoch %d", config.max_train_seconds, state.epoch)
            break
        epoch = state.epoch + 1
        set_train_mode(net, config)
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        bar = _progress(train_batches(epoch), steps_per_epoch, f"epoch {epoch}/{epochs}", config.progress)
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            y = y.to(device, dtype=torch.float32, non_blocking=True)
            with amp_context(device, config):
                logits = logits_of(x)
            loss = criterion(logits.float(), y) + reg()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        train_seconds = time.perf_counter() - t0
        if validate is not None:
            val = _val_summary(*validate())
        else:
            val = {"val_loss": float("nan"), "val_auc": float("nan"), "val_accuracy": float("nan")}
        state.epoch = epoch
        state.images_seen += seen
        state.seconds += time.perf_counter() - t0
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            **val,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": seen / max(train_seconds, 1e-9),
        }
        state.history.append(row)
        score = _monitor_value(config, val) if validate is not None else float(epoch)  # no validation: the last
        if score > state.best_score:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        else:
            state.bad_epochs += 1
        level = logging.INFO if config.mode != "head" or epoch % 20 == 0 or epoch == epochs else logging.DEBUG
        logger.log(
            level,
            "epoch %d: train loss %.4f, val loss %.4f, val AUC %.4f, val acc %.4f, %.1f img/s%s",
            epoch,
            row["train_loss"],
            val["val_loss"],
            val["val_auc"],
            val["val_accuracy"],
            row["images_per_second"],
            " (best)" if state.best_epoch == epoch else "",
        )
        if last_path is not None and (save_last_every_epoch or state.epoch >= epochs or state.bad_epochs >= patience):
            _save_last(last_path, net, optimizer, scheduler, state, config, generator)
    if state.bad_epochs >= patience:
        logger.info("early stop after epoch %d: no improvement for %d epochs", state.epoch, config.patience)
    return state


def _save_last(path: Path, net, optimizer, scheduler, state: FitState, config: TrainConfig, generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "mode": config.mode,
            "model_state": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": {k: v for k, v in vars(state).items() if k != "best_state"},
            "best_state": state.best_state,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
                "loader": generator.get_state() if generator is not None else None,
            },
        },
        tmp,
    )
    tmp.replace(path)  # atomic: an interrupted save never leaves a broken last.pt


def _load_last(path: Path, net, optimizer, scheduler, config: TrainConfig, generator) -> FitState:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("mode") != config.mode:
        raise ConfigError(f"cannot resume: {path} is a {ckpt.get('mode')!r} run, the config asks for {config.mode!r}")
    net.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    state = FitState(**ckpt["state"], best_state=ckpt["best_state"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    if generator is not None and ckpt["rng"]["loader"] is not None:
        generator.set_state(ckpt["rng"]["loader"])
    return state
