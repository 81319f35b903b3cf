"""The training stage's configuration: one frozen dataclass, loaded from YAML plus `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from inspection.errors import ConfigError

LITE0 = "tf_efficientnet_lite0"  # same name as inspection.models.backbone.LITE0 (kept here: no torch import)

MODES = ("head", "partial", "full", "auto")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentations for top-view castings: a part may lie at any angle and either side up, under drifting light."""

    enabled: bool = True  # off for the "no augmentation" baselines
    rotate_limit: int = 180  # parts lie at any angle on the conveyor
    rotate_p: float = 0.7  # keep some un-rotated views: the camera sees many parts at their nominal pose
    hflip_p: float = 0.5  # a flipped casting is still a plausible casting
    vflip_p: float = 0.5
    brightness_limit: float = 0.15  # lamp ageing and exposure drift between shifts
    contrast_limit: float = 0.15
    brightness_contrast_p: float = 0.5
    gamma_limit: tuple[int, int] = (85, 115)  # camera gamma / sensor response drift, in percent
    gamma_p: float = 0.3
    blur_limit: int = 3  # largest blur kernel: slight defocus or motion, never enough to hide a blowhole
    blur_p: float = 0.1
    noise_std_range: tuple[float, float] = (0.01, 0.04)  # sensor noise as a fraction of 255 (std_range, not var_limit)
    noise_p: float = 0.2

    def validate(self) -> None:
        if not 0 <= self.rotate_limit <= 180:
            raise ConfigError(f"augment.rotate_limit: got {self.rotate_limit}, allowed 0..180 degrees")
        for name in ("rotate_p", "hflip_p", "vflip_p", "brightness_contrast_p", "gamma_p", "blur_p", "noise_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment.{name}: got {value}, allowed 0..1 (a probability)")
        if self.blur_limit < 3:
            raise ConfigError(f"augment.blur_limit: got {self.blur_limit}, allowed an odd kernel size >= 3")
        lo, hi = self.noise_std_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"augment.noise_std_range: got {self.noise_std_range}, allowed 0 <= lo <= hi <= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; the resolved copy is written to RUN_DIR/config.yaml."""

    data: str | None = None  # store, manifest or def_front/ok_front folder; the CLI's --data overrides it
    work_dir: str | None = None  # where a raw folder is ingested; None = RUN_DIR/store (share it between runs)
    backbone: str = LITE0  # the backbone whose packaged ImageNet weights we ship
    pretrained: bool = True  # False = from scratch (only for the data-efficiency comparison)
    weights: str | None = None  # local weights file for backbones other than tf_efficientnet_lite0
    input_size: int = 224  # the weights were trained at 224; smaller is faster on a CPU
    resize: Literal["squash", "letterbox"] = "squash"  # letterbox keeps a non-square photo's aspect (padded)
    dropout: float = 0.2  # before the linear head
    mode: Literal["head", "partial", "full", "auto"] = "partial"  # auto: picked by grouped CV (configs/train.yaml)
    auto_budget_s: float = 900.0  # auto: wall seconds for the search and the final fit on this machine
    auto_modes: tuple[str, ...] = ("head", "partial")  # auto: the modes it may try (full is rarely affordable)
    auto_max_size: int = 448  # auto: the largest input it tries (the photos' median long side, up to this)
    auto_max_epochs: int = 12  # auto: fine-tuning candidates early-stop within this many epochs per fold
    taps: tuple[int, ...] = ()  # backbone stages whose pooled outputs the head reads besides the last features
    # (configs/train.yaml: 2-6); the heatmap then combines their class-activation maps on a 1/16 grid
    validation: Literal["crossfit", "split"] = "crossfit"  # crossfit: K folds by part, thresholds from all
    # out-of-fold scores, the final model fitted on every labelled part; split: the store's train/val/test
    folds: int = 5  # crossfit: folds (whole parts, label-stratified)
    head_solver: Literal["lbfgs", "adamw"] = "lbfgs"  # head mode: convex L2 logistic regression, or the AdamW loop
    head_c: float = 0.01  # lbfgs: inverse L2 strength on standardised features (grouped CV: 0.01-0.03 best)
    # mean: the head reads average-pooled maps; lse: a multiple-instance head, the log-sum-exp of the heatmap
    # grid's cell logits (small local defects on large textured parts); auto tries lse when it fits in memory
    head_pooling: Literal["mean", "lse"] = "mean"
    pool_temperature: float = 1.0  # lse: r (-> 0: the mean; large: the maximum); tiles: 1 beat 3
    max_cache_gb: float = 4.0  # lse caches every photo's grid features (half precision) in memory: the limit
    calibration: Literal["platt", "none"] = "platt"  # scale logits so a score is a probability (fitted out of fold)
    defect_types: bool = True  # learn the defect types the labels name (label map `crack: defect:crack`)
    exclude: str | None = None  # registry folder or golden.json: its parts never reach training or calibration
    frozen_engine: Literal["auto", "onnxruntime", "torch"] = "auto"  # auto: onnxruntime on the CPU, torch on CUDA
    trainable_blocks: int = 2  # partial: last N backbone stages (plus conv_head) are trained
    epochs: int = 8  # partial/full: few epochs suffice from ImageNet features
    head_epochs: int = 60  # head mode trains on cached features: an epoch costs milliseconds
    cached_views: int = 0  # head / cached partial: augmented views per training image run through the frozen part
    partial_cache: bool = False  # partial: run the frozen trunk once and cache its activations (no image-level
    # augmentation then, only `cached_views` fixed views and `feature_flips`); makes CPU training ~3x faster
    feature_flips: bool = True  # cached partial: random flips / 90-degree turns of the cached activation maps
    max_train_seconds: float | None = None  # stop after the epoch that crosses this wall-time budget
    batch_size: int = 32
    lr: float = 1e-3  # the new head's learning rate
    backbone_lr: float = 3e-4  # the last trained stage's learning rate (partial/full)
    layer_decay: float = 0.6  # full: each earlier stage learns this much slower (discriminative learning rates)
    weight_decay: float = 1e-4  # AdamW's decoupled decay, on the head and on non-L2-SP parameters
    l2sp: float = 1e-4  # full/partial: pull the trained backbone toward its pretrained weights (L2-SP)
    freeze_bn: bool = True  # keep pretrained BatchNorm statistics (small CPU batches); ignored from scratch
    warmup_epochs: float = 1.0  # linear warm-up before the cosine decay, so the new head does not wreck the trunk
    patience: int = 4  # early stopping: epochs without validation improvement
    monitor: Literal["val_loss", "val_auc", "val_accuracy"] = "val_loss"  # val loss still moves when AUC is 1.0
    balance: Literal["pos_weight", "sampler", "none"] = "pos_weight"  # class imbalance: weight the loss
    target_escape_rate: float = 0.005  # calibrated reject threshold: at most this share of defects passes on val
    review_escape_rate: float | None = 0.0  # review band: below the lower threshold at most this share of defects
    review_fraction: float | None = None  # alternative: review threshold = this fraction of the reject threshold
    review_max_ok_rate: float | None = None  # alternative: at most this share of good val parts flagged (QA capacity)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # CUDA only: bf16 where supported, else fp16 with a grad scaler
    channels_last: bool = True  # CUDA only: faster convolutions on tensor cores
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    num_workers: int = 0  # DataLoader workers; 0 on a 2-core box (decode is cheaper than a process hop)
    feature_cache: str | None = None  # directory of cached head-mode features keyed by sha256+backbone+size+weights
    resume: bool = False  # continue from RUN_DIR/last.pt if it exists
    progress: bool = True  # tqdm bar with images/s when stderr is a terminal
    max_per_class: int | None = None  # use at most N training images per class (data-efficiency studies)
    plots: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode: got {self.mode!r}, allowed: {', '.join(MODES)}")
        if self.input_size < 32:
            raise ConfigError(f"input_size: got {self.input_size}, allowed >= 32 pixels")
        for name in ("epochs", "head_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: got {getattr(self, name)}, allowed >= 1")
        if self.trainable_blocks < 1:
            raise ConfigError(f"trainable_blocks: got {self.trainable_blocks}, allowed >= 1")
        if self.cached_views < 0:
            raise ConfigError(f"cached_views: got {self.cached_views}, allowed >= 0")
        for name in ("lr", "backbone_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, allowed > 0")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay: got {self.layer_decay}, allowed 0 < x <= 1")
        if not 0 <= self.target_escape_rate < 1:
            raise ConfigError(f"target_escape_rate: got {self.target_escape_rate}, allowed 0 <= x < 1")
        if self.review_escape_rate is not None and not 0 <= self.review_escape_rate <= self.target_escape_rate:
            raise ConfigError(
                f"review_escape_rate: got {self.review_escape_rate}, allowed 0 <= x <= target_escape_rate "
                f"({self.target_escape_rate}): the review threshold must not be above the reject threshold"
            )
        if self.review_fraction is not None and not 0 <= self.review_fraction <= 1:
            raise ConfigError(f"review_fraction: got {self.review_fraction}, allowed 0..1")
        if self.review_max_ok_rate is not None and not 0 <= self.review_max_ok_rate <= 1:
            raise ConfigError(f"review_max_ok_rate: got {self.review_max_ok_rate}, allowed 0..1")
        rules = [
            n for n in ("review_escape_rate", "review_max_ok_rate", "review_fraction") if getattr(self, n) is not None
        ]
        if len(rules) > 1:
            raise ConfigError(
                f"review band: set one of review_escape_rate, review_max_ok_rate, review_fraction (the others to "
                f"null; review_escape_rate defaults to 0.0); got {', '.join(rules)}"
            )
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ConfigError(f"max_per_class: got {self.max_per_class}, allowed >= 1 or null")
        bad_modes = [m for m in self.auto_modes if m not in MODES[:3]]
        if bad_modes or not self.auto_modes:
            raise ConfigError(f"auto_modes: got {list(self.auto_modes)}, allowed a non-empty subset of {MODES[:3]}")
        if self.auto_max_epochs < 1:
            raise ConfigError(f"auto_max_epochs: got {self.auto_max_epochs}, allowed >= 1")
        if not self.auto_budget_s > 0:
            raise ConfigError(f"auto_budget_s: got {self.auto_budget_s}, allowed > 0 seconds")
        if self.folds < 2:
            raise ConfigError(f"folds: got {self.folds}, allowed >= 2")
        if self.head_pooling not in ("mean", "lse"):
            raise ConfigError(f"head_pooling: got {self.head_pooling!r}, allowed: mean, lse")
        if not self.pool_temperature > 0:
            raise ConfigError(f"pool_temperature: got {self.pool_temperature}, allowed > 0")
        if self.head_pooling == "lse" and self.mode == "head" and self.head_solver != "lbfgs":
            raise ConfigError("head_pooling lse in head mode is fitted by its own solver: set head_solver: lbfgs")
        if not self.head_c > 0:
            raise ConfigError(f"head_c: got {self.head_c}, allowed > 0")
        if self.validation not in ("crossfit", "split"):
            raise ConfigError(f"validation: got {self.validation!r}, allowed: crossfit, split")
        if any(t < 0 for t in self.taps):
            raise ConfigError(f"taps: got {list(self.taps)}, allowed backbone stage indices >= 0")
        if self.weights is not None and not self.pretrained:
            raise ConfigError("weights is set but pretrained is false: drop --from-scratch or the weights file")
