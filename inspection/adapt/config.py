"""The adaptation stage's configuration: one frozen dataclass, loaded from YAML plus `key=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from inspection.errors import ConfigError


@dataclass(frozen=True)
class GapConfig:
    """How the domain-gap score is measured and when it warns."""

    max_images: int = 400  # per side: the Fréchet estimate is stable well before this; features cost a forward pass
    pca_dim: int = 32  # covariances are estimated in this many principal directions (small samples, 1280-d features)
    shrinkage: bool = True  # Ledoit-Wolf shrinkage of the covariances: a few hundred samples cannot fill 32x32 exactly
    calibration_splits: int = 10  # random half-splits of the source that give the noise floor of the score
    warn_factor: float = 3.0  # warn when the gap exceeds this many times the noise floor (p95 of the half-splits)
    min_warn_level: float = 0.05  # never warn below this normalised score, however quiet the source is
    seed: int = 0

    def validate(self) -> None:
        if self.max_images < 8:
            raise ConfigError(f"gap.max_images: got {self.max_images}, allowed >= 8 (per side)")
        if self.pca_dim < 1:
            raise ConfigError(f"gap.pca_dim: got {self.pca_dim}, allowed >= 1")
        if self.calibration_splits < 2:
            raise ConfigError(f"gap.calibration_splits: got {self.calibration_splits}, allowed >= 2")
        if not self.warn_factor >= 1.0:
            raise ConfigError(f"gap.warn_factor: got {self.warn_factor}, allowed >= 1 (a multiple of the noise floor)")
        if self.min_warn_level < 0:
            raise ConfigError(f"gap.min_warn_level: got {self.min_warn_level}, allowed >= 0")


@dataclass(frozen=True)
class AdaptConfig:
    """Everything that decides an adaptation run; the resolved copy is written to RUN_DIR2/adapt_config.yaml."""

    bn_mode: Literal["align", "adabn"] = "align"  # align: target BN inputs matched to the source's (see bn_adapt.py)
    max_target_images: int = 2000  # statistics converge after a few hundred images; more only costs time
    max_source_images: int = 400  # source images for the per-layer source statistics (align) and the gap score
    batch_size: int = 32  # BN statistics are averaged per batch: batches must be big enough to be representative
    self_train: bool = False  # short self-training on confident pseudo-labels after the BN re-estimation
    pseudo_confidence: float = 0.9  # a pseudo-label is kept when p >= this (defect) or p <= 1 - this (ok)
    self_train_epochs: int = 2  # short: pseudo-labels are noisy and errors reinforce themselves
    self_train_lr: float = 1e-4
    self_train_max_images: int = 512  # per epoch, class-balanced
    labelled_epochs: int = 30  # a few labelled target images: many passes, tiny learning rate, flips as augmentation
    labelled_lr: float = 3e-4
    trainable: Literal["head", "head_bn"] = "head_bn"  # what fine-tuning may change: the head and BN scale/shift only
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    seed: int = 0
    gap: GapConfig = field(default_factory=GapConfig)

    def validate(self) -> None:
        for name in ("max_target_images", "max_source_images", "batch_size", "self_train_max_images"):
            if getattr(self, name) < 2:
                raise ConfigError(f"{name}: got {getattr(self, name)}, allowed >= 2")
        if not 0.5 < self.pseudo_confidence < 1.0:
            raise ConfigError(f"pseudo_confidence: got {self.pseudo_confidence}, allowed 0.5 < x < 1")
        for name in ("self_train_epochs", "labelled_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, allowed >= 0")
        for name in ("self_train_lr", "labelled_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, allowed > 0")
        if self.threads < 0:
            raise ConfigError(f"threads: got {self.threads}, allowed >= 0")
