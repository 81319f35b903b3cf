"""Fine-tuning the pretrained CNN in one of three modes (the transfer-learning playbook).

- `head`: the backbone is frozen (BatchNorm statistics included: eval mode); pooled features are computed once
  (optionally cached on disk by image sha256 + backbone + input size + weights) and only the linear head trains.
- `partial`: the last N backbone stages, conv_head and the head train; earlier stages are frozen, in eval mode.
- `full`: everything trains, with discriminative learning rates (earlier stages slower), warm-up, L2-SP toward the
  pretrained weights and frozen BatchNorm statistics, which guard against catastrophic forgetting.

AdamW, linear warm-up then cosine decay per step, early stopping on the validation metric, the best checkpoint
kept, `last.pt` to resume, seeded. On CUDA: autocast (bf16 where supported, else fp16) and channels-last.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inspection.config import save_config
from inspection.errors import ConfigError
from inspection.models import CLASS_NAMES, InspectionNet, build_net
from inspection.models.backbone import LITE0
from inspection.schemas import Metrics, ModelCard, Thresholds
from inspection.train.calibrate import calibrate_threshold, calibration_report
from inspection.train.config import TrainConfig
from inspection.train.data import (
    ImageDataset,
    build_augment,
    common_size,
    data_fingerprint,
    make_loader,
    pos_weight_for,
    resolve_samples,
    split_samples,
    targets_of,
)
from inspection.train.evaluate import evaluate_scores, line_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    card: ModelCard
    metrics: dict[str, Metrics]
    best_epoch: int
    epochs_run: int
    train_seconds: float  # wall time of the fit, feature extraction included
    images_per_second: float  # training images (augmented views included) through the network per second
    history: list[dict[str, Any]] = field(default_factory=list)


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
        dropout=config.dropout,
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
def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()))


@torch.no_grad()
def predict_scores(
    net: InspectionNet,
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    batch_size: int = 64,
    device: torch.device | None = None,
    config: TrainConfig | None = None,
) -> np.ndarray:
    """Defect probabilities (N,) for `samples`, network in eval mode, no augmentation."""
    device = device or torch.device("cpu")
    was_training = net.training
    net.eval()
    # its own generator: creating a loader iterator draws a seed, which must not shift the training RNG
    loader = torch.utils.data.DataLoader(
        ImageDataset(samples, size_hw), batch_size=batch_size, shuffle=False, generator=torch.Generator()
    )
    out = []
    ctx = amp_context(device, config) if config is not None else nullcontext()
    for images, _ in loader:
        with ctx:
            logits = net.forward_logits(images.to(device, non_blocking=True))
        out.append(torch.sigmoid(logits.float()).cpu())
    net.train(was_training)
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


class FeatureCache:
    """Pooled features of a frozen backbone on disk: one file per (backbone, input size, weights, image size)."""

    def __init__(self, directory: str | Path | None, key: str | None):
        self.path = (
            Path(directory) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt" if directory and key else None
        )
        self.key = key
        self.table: dict[str, torch.Tensor] = {}
        if self.path is not None and self.path.is_file():
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                self.table = stored["features"]
        self.dirty = False

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({"key": self.key, "features": self.table}, tmp)
            tmp.replace(self.path)
            self.dirty = False


def weights_tag(config: TrainConfig) -> str | None:
    """What the frozen backbone's weights are, for cache keys; None when they are random (not cacheable)."""
    if not config.pretrained:
        return None
    if config.weights is not None:
        return hashlib.sha256(Path(config.weights).read_bytes()).hexdigest()[:16]
    return "imagenet-packaged" if config.backbone == LITE0 else None


@torch.no_grad()
def extract(
    net: InspectionNet,
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    device: torch.device,
    config: TrainConfig,
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache: FeatureCache | None = None,
    augment: Any | None = None,
    desc: str = "features",
) -> torch.Tensor:
    """`fn(uint8 images)` per sample, network in eval mode (default: pooled features (N, C)).

    Clean views (augment=None) are read from / added to `cache`, keyed by image sha256.
    """
    fn = fn or net.pooled_features
    net.eval()
    use_cache = cache is not None and augment is None
    todo = [i for i, s in enumerate(samples) if s.sha256 not in cache.table] if use_cache else list(range(len(samples)))
    feats: dict[int, torch.Tensor] = {}
    if todo:
        dataset = ImageDataset([samples[i] for i in todo], size_hw, augment)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=64, shuffle=False, num_workers=config.num_workers, generator=torch.Generator()
        )
        pos = 0
        for images, _ in _progress(loader, len(loader), desc, config.progress):
            with amp_context(device, config):
                rows = fn(images.to(device, non_blocking=True)).float().cpu()
            for row in rows:
                feats[todo[pos]] = row.clone()
                pos += 1
        if use_cache:
            for i, row in feats.items():
                cache.table[samples[i].sha256] = row
            cache.dirty = True
    rows = [feats[i] if i in feats else cache.table[samples[i].sha256] for i in range(len(samples))]  # type: ignore[union-attr]
    return torch.stack(rows) if rows else torch.zeros(0)


def split_point(net: InspectionNet, config: TrainConfig) -> int:
    """Index of the first trained stage in `backbone.blocks` (partial mode)."""
    return len(net.backbone.blocks) - config.trainable_blocks


def trunk_activations(net: InspectionNet, images: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 images -> activations after the frozen stem and stages [0, k): (N, C, h, w)."""
    bb = net.backbone
    x = bb.bn1(bb.conv_stem(net.preprocess(images)))
    for stage in bb.blocks[:k]:
        x = stage(x)
    return x


def tail_logits(net: InspectionNet, x: torch.Tensor, k: int) -> torch.Tensor:
    """The rest of forward_features from stage k on, then the head: (N, C, h, w) -> logits (N,)."""
    bb = net.backbone
    for stage in bb.blocks[k:]:
        x = stage(x)
    x = bb.bn2(bb.conv_head(x))
    return net.logits_from_pooled(x.mean(dim=(2, 3)))


def random_d4(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A random flip / quarter turn per batch of activation maps (N, C, h, w): cheap spatial augmentation."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if int(torch.randint(0, 2, (1,), generator=generator)) else x


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
    validate: Callable[[], tuple[np.ndarray, np.ndarray]],
    pos_weight: float | None,
    device: torch.device,
    out: Path,
    save_last_every_epoch: bool = True,
    generator: torch.Generator | None = None,
) -> FitState:
    """Train with AdamW + warm-up/cosine; early stopping on `config.monitor`; best weights kept; `last.pt` resume."""
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
    last_path = out / "last.pt"
    if config.resume and last_path.is_file():
        state = _load_last(last_path, net, optimizer, scheduler, config, generator)
        logger.info("resumed from %s after epoch %d", last_path, state.epoch)
    while state.epoch < epochs and state.bad_epochs < config.patience:
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
        scores, targets = validate()
        val = _val_summary(scores, targets)
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
        score = _monitor_value(config, val)
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
        if save_last_every_epoch or state.epoch >= epochs or state.bad_epochs >= config.patience:
            _save_last(last_path, net, optimizer, scheduler, state, config, generator)
    if state.bad_epochs >= config.patience:
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


# ------------------------------------------------------------------------------------------------------- the stage
def run_train(config: TrainConfig, data: Path | str | Sequence[Any] | None, out: Path | str) -> TrainResult:
    """Train per `config` on `data` (store, manifest, image folder or a list of samples) into run directory `out`."""
    from inspection.train.plots import plot_history, write_eval_plots
    from inspection.train.run_dir import write_run

    out = Path(out)
    if config.mode != "full" and not config.pretrained:
        logger.warning("mode %s freezes a randomly initialised backbone (pretrained=false)", config.mode)
    data = data if data is not None else config.data
    if data is None:
        raise ConfigError("no data: pass --data (store, manifest or image folder) or set `data:` in the config")
    existing = [name for name in ("checkpoint.pt", "last.pt") if (out / name).is_file()]
    if existing and not config.resume:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume (resume=true) to continue it, "
            "or choose a new --out: a finished run is never overwritten"
        )
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    generator = seed_everything(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    samples = resolve_samples(data, Path(config.work_dir) if config.work_dir else out / "store")
    splits = split_samples(samples, config.max_per_class, config.seed)
    logger.info(
        "data: %s",
        ", ".join(f"{k} {len(v)} ({int(targets_of(v).sum())} defect)" for k, v in splits.items()),
    )
    device = select_device(config)
    net = build_net_for(config).to(device)
    if device.type == "cuda" and config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    apply_freeze(net, config)
    size_hw = common_size([s for items in splits.values() for s in items])
    train_targets = targets_of(splits["train"])
    pos_weight = pos_weight_for(train_targets) if config.balance == "pos_weight" else None

    t_start = time.perf_counter()
    if config.mode == "head" or (config.mode == "partial" and config.partial_cache):
        state, scores = _train_cached(net, config, splits, size_hw, device, pos_weight, out, generator)
    else:
        state, scores = _train_finetune(net, config, splits, size_hw, device, pos_weight, out, generator)
    fit_seconds = time.perf_counter() - t_start

    labels = {k: [s.label for s in v] for k, v in splits.items()}
    thresholds = calibrate_threshold(
        scores["val"],
        labels["val"],
        config.target_escape_rate,
        config.review_escape_rate,
        config.review_fraction,
        config.review_max_ok_rate,
    )
    metrics = {k: evaluate_scores(scores[k], labels[k], thresholds) for k in ("val", "test") if len(scores[k])}
    calibration = calibration_report(scores["val"], labels["val"], thresholds, config.target_escape_rate)
    fingerprint = data_fingerprint(splits["train"])
    created = datetime.now(UTC)
    card = ModelCard(
        version=f"{created:%Y%m%dT%H%M%S}-{config.mode}-{fingerprint[:8]}",
        created_at=created,
        backbone=config.backbone,
        mode=config.mode,
        class_names=list(CLASS_NAMES),
        preprocess=net.preprocess.config.to_dict(),
        thresholds=thresholds,
        target_escape_rate=config.target_escape_rate,
        calibration=calibration,
        metrics=metrics,
        data_fingerprint=fingerprint,
        n_train=len(splits["train"]),
        files={},
        notes=f"{config.mode} fine-tuning; best epoch {state.best_epoch} of {state.epoch}",
    )
    images_per_second = state.images_seen / max(fit_seconds, 1e-9)
    extra = {
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "train_seconds": fit_seconds,
        "images_per_second": images_per_second,
        "device": str(device),
        "line": {k: line_report(scores[k], labels[k], thresholds) for k in metrics},
        "history": state.history,
        "size_hw": list(size_hw),
        "counts": {k: {"n": len(v), "defect": int(targets_of(v).sum())} for k, v in splits.items()},
    }
    write_run(out, net, config, card, splits, extra, epoch=state.best_epoch)
    for k in ("val", "test"):  # raw scores in samples.json order: re-plot or re-threshold without the network
        np.save(out / f"{k}_scores.npy", np.asarray(scores[k], dtype=np.float64))
    write_run_drift_reference(out, splits["val"], scores["val"], thresholds, card.version)
    if config.plots:
        plot_dir = out / "plots"
        main_split = "test" if len(scores["test"]) else "val"
        main_samples = splits[main_split]
        write_eval_plots(scores[main_split], labels[main_split], main_samples, thresholds, plot_dir)
        if main_split == "test":
            write_eval_plots(scores["val"], labels["val"], splits["val"], thresholds, plot_dir, prefix="val")
        plot_history(state.history, plot_dir)
    summary = {
        k: f"acc {m.accuracy:.4f} recall {m.defect_recall:.4f} FRR {m.false_reject_rate:.4f}"
        for k, m in metrics.items()
    }
    logger.info("done in %.1f s (%s); thresholds %s; %s", fit_seconds, device, thresholds, json.dumps(summary))
    return TrainResult(
        run_dir=out,
        card=card,
        metrics=metrics,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        train_seconds=fit_seconds,
        images_per_second=images_per_second,
        history=state.history,
    )


def write_run_drift_reference(
    out: Path, samples: Sequence[Any], scores: np.ndarray, thresholds: Thresholds, version: str
) -> None:
    """What the line should look like for this model: image statistics and scores of (up to 1,000 of) the
    validation images, from the scores just computed (no second pass); export ships it to the runner."""
    from inspection.adapt.data import subsample
    from inspection.adapt.reference import MIN_IMAGES, reference_from_scores
    from inspection.drift import REFERENCE_FILE

    if len(samples) < MIN_IMAGES:
        logger.warning("no drift reference: %d validation images (< %d)", len(samples), MIN_IMAGES)
        return
    picked = subsample(list(range(len(samples))), 1000, seed=0)
    probs = np.asarray(scores, dtype=np.float64)[picked]
    paths = [samples[i].path for i in picked]
    reference_from_scores(paths, probs, thresholds, f"{version} on its val split").save(out / REFERENCE_FILE)


def _train_cached(net, config, splits, size_hw, device, pos_weight, out, generator):
    """Run the frozen part once per image (cached), then train only what follows it: head or partial tail.

    head: the whole backbone is frozen, pooled features (N, C) are cached, the linear head trains.
    partial with partial_cache: stem + early stages are frozen, their activations (N, C, h, w) are cached,
    the last stages + conv_head + head train on them (with random flips / quarter turns of the maps).
    """
    head = config.mode == "head"
    if head:
        part, fn, logits_of, epochs = "pooled", net.pooled_features, net.logits_from_pooled, config.head_epochs
    else:
        k = split_point(net, config)
        part, epochs = f"trunk{k}", config.epochs

        def fn(images):
            return trunk_activations(net, images, k)

        def logits_of(x):
            return tail_logits(net, x, k)

    tag = weights_tag(config)
    key = f"{config.backbone}|{config.input_size}|{tag}|{size_hw[0]}x{size_hw[1]}|{part}" if tag else None
    cache = FeatureCache(config.feature_cache, key) if config.feature_cache and key else None
    memo = cache if cache is not None else FeatureCache(None, "memory")  # in-memory only: still one pass per image
    t0 = time.perf_counter()
    feats = {
        k_: extract(net, v, size_hw, device, config, fn, memo, desc=f"{k_} {part}") for k_, v in splits.items() if v
    }
    feats.setdefault("test", torch.zeros(0))
    train_x, train_y = [feats["train"]], [torch.as_tensor(targets_of(splits["train"]))]
    augment = build_augment(config.augment, config.seed)
    for view in range(config.cached_views if augment is not None else 0):
        train_x.append(
            extract(net, splits["train"], size_hw, device, config, fn, augment=augment, desc=f"view {view + 1}")
        )
        train_y.append(train_y[0])
    if cache is not None:
        cache.save()
    n_images = sum(len(v) for v in splits.values()) + config.cached_views * len(splits["train"])
    logger.info("frozen part (%s) on %d images in %.1f s", part, n_images, time.perf_counter() - t0)
    x = torch.cat(train_x)
    y = torch.cat(train_y)
    n = len(y)
    steps = max(1, n // config.batch_size) if n > config.batch_size else 1
    flips = config.feature_flips and not head

    def batches(epoch: int):
        if config.balance == "sampler":
            from inspection.train.data import balanced_sampler

            order = torch.as_tensor(list(balanced_sampler(y.numpy(), generator)))
        else:
            order = torch.randperm(n, generator=generator)
        for i in range(0, steps * config.batch_size if n > config.batch_size else n, config.batch_size):
            idx = order[i : i + config.batch_size]
            xb = x[idx]
            yield (random_d4(xb, generator) if flips else xb), y[idx]

    val_targets = targets_of(splits["val"])

    @torch.no_grad()
    def score(f: torch.Tensor) -> np.ndarray:
        net.eval()
        out_ = [torch.sigmoid(logits_of(f[i : i + 256].to(device)).float()).cpu() for i in range(0, len(f), 256)]
        return torch.cat(out_).numpy().astype(np.float64) if out_ else np.zeros(0)

    def validate():
        return score(feats["val"]), val_targets

    threads = torch.get_num_threads()
    if head:
        # a linear head on (32, C) batches: each op takes microseconds, and waking a second thread costs more
        # than the op (10x slower per epoch on a busy 2-core box)
        torch.set_num_threads(1)
    try:
        state = fit(
            net,
            config,
            epochs,
            batches,
            steps,
            logits_of,
            validate,
            pos_weight,
            device,
            out,
            save_last_every_epoch=not head,
            generator=generator,
        )
    finally:
        torch.set_num_threads(threads)
    state.images_seen += n_images  # the frozen part's work, counted once
    net.load_state_dict(state.best_state)
    net.eval()
    scores = {k_: score(feats[k_]) for k_ in ("val", "test")}
    return state, scores


def _train_finetune(net, config, splits, size_hw, device, pos_weight, out, generator):
    loader = make_loader(splits["train"], size_hw, config, train=True, generator=generator)
    augment = loader.dataset.augment

    def batches(epoch: int):
        if augment is not None:
            augment.set_random_seed(config.seed * 100_003 + epoch)  # resumable: epoch k always sees the same draws
        return loader

    val_targets = targets_of(splits["val"])

    def validate():
        return predict_scores(net, splits["val"], size_hw, 64, device, config), val_targets

    state = fit(
        net,
        config,
        config.epochs,
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
    # the train split is not scored: it would cost a full pass for a number nobody should trust
    scores = {k: predict_scores(net, splits[k], size_hw, 64, device, config) for k in ("val", "test")}
    return state, scores
