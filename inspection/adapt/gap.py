"""Domain-gap score: how far the target images' backbone features lie from the source images'.

The score is the Fréchet distance between Gaussian fits of the two pooled-feature distributions, computed in
the top principal directions of the pooled data with Ledoit-Wolf shrunk covariances (a few hundred samples
cannot estimate a 1280x1280 covariance), divided by the source features' total variance so it does not depend on
the backbone's feature scale: 0 = same distribution; ~1 = the target mean moved by one source "total std".

Any finite-sample estimate is positive even for two samples of one domain, so the score is stated next to its
noise floor, measured on random half-splits of the source at the same sample size, and a warning level of
`warn_factor` times that floor: above it, transfer of the source model to the target is not to be trusted
without adaptation and a check on labelled target images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inspection.adapt.config import GapConfig
from inspection.adapt.data import iter_input_batches
from inspection.errors import DataError

logger = logging.getLogger(__name__)


@torch.no_grad()
def features_and_scores(
    net: nn.Module, items: Sequence[Path | np.ndarray], batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled backbone features (N, C), defect probabilities (N,) and the indices of `items` that decoded."""
    net.eval()
    feats, probs, kept = [], [], []
    for idx, x in iter_input_batches(net, items, batch_size):
        pooled = net.feature_maps(x).mean(dim=(2, 3))  # (B, C)
        feats.append(pooled.numpy())
        probs.append(torch.sigmoid(net.logits_from_pooled(pooled)).numpy())
        kept.append(idx)
    if not feats:
        raise DataError("no image could be read to compute features")
    return np.concatenate(feats), np.concatenate(probs), np.concatenate(kept)


def _sqrtm_trace(a: np.ndarray, b: np.ndarray) -> float:
    """tr((A B)^{1/2}) for symmetric PSD A, B, via tr((A^{1/2} B A^{1/2})^{1/2}) (symmetric, stable)."""
    w, v = np.linalg.eigh(a)
    a_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a_half @ b @ a_half
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _covariance(x: np.ndarray, shrinkage: bool) -> np.ndarray:
    if shrinkage:
        from sklearn.covariance import LedoitWolf

        return LedoitWolf().fit(x).covariance_
    return np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(a: np.ndarray, b: np.ndarray, pca_dim: int = 32, shrinkage: bool = True) -> float:
    """Fréchet distance between Gaussian fits of samples a (n, C) and b (m, C) in the top principal directions."""
    pooled = np.concatenate([a, b]).astype(np.float64)
    center = pooled.mean(axis=0)
    k = max(1, min(pca_dim, len(a) - 1, len(b) - 1, pooled.shape[1]))
    _, _, vt = np.linalg.svd(pooled - center, full_matrices=False)
    basis = vt[:k].T  # (C, k)
    pa, pb = (a - center) @ basis, (b - center) @ basis
    ca, cb = _covariance(pa, shrinkage), _covariance(pb, shrinkage)
    diff = pa.mean(axis=0) - pb.mean(axis=0)
    return float(max(0.0, diff @ diff + np.trace(ca) + np.trace(cb) - 2.0 * _sqrtm_trace(ca, cb)))


@dataclass(frozen=True)
class GapResult:
    score: float  # normalised Fréchet distance source -> target (mean over random equal-size subsamples)
    noise_floor: float  # 95th percentile of the score between random halves of the source (same sample size)
    noise_mean: float
    warn_level: float  # max(warn_factor * noise_floor, min_warn_level)
    warning: bool  # score > warn_level: transfer is unreliable
    n_source: int
    n_target: int
    sample_size: int  # images per side in each comparison
    dims: int  # principal directions used
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def domain_gap(source: np.ndarray, target: np.ndarray, config: GapConfig = GapConfig()) -> GapResult:
    """Gap score between source features (n, C) and target features (m, C), with its calibrated warning level."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise DataError(f"features must be (n, C) and (m, C) with the same C; got {source.shape} and {target.shape}")
    if len(source) < 8 or len(target) < 4:
        raise DataError(
            f"too few images for a gap score: {len(source)} source, {len(target)} target; allowed >= 8 and >= 4"
        )
    rng = np.random.default_rng(config.seed)
    # equal sizes on both sides, no larger than half the source, so the half-split calibration is like for like
    m = min(len(target), len(source) // 2, config.max_images)
    scale = float(source.var(axis=0).sum()) or 1.0  # source total variance: makes the score unit-free
    k = min(config.pca_dim, m - 1)

    def score(a: np.ndarray, b: np.ndarray) -> float:
        return frechet_distance(a, b, pca_dim=k, shrinkage=config.shrinkage) / scale

    gaps, null = [], []
    for _ in range(config.calibration_splits):
        perm = rng.permutation(len(source))
        null.append(score(source[perm[:m]], source[perm[m : 2 * m]]))
        gaps.append(score(source[perm[:m]], target[rng.choice(len(target), size=m, replace=False)]))
    noise_floor = float(np.quantile(null, 0.95))
    warn_level = max(config.warn_factor * noise_floor, config.min_warn_level)
    value = float(np.mean(gaps))
    warning = value > warn_level
    if warning:
        message = (
            f"domain gap {value:.3f} is above the warning level {warn_level:.3f} "
            f"({config.warn_factor:g} x the source's own half-split noise {noise_floor:.3f}): "
            "transfer of the source model is unreliable; adapt and check on labelled target images"
        )
    elif value > noise_floor:
        message = f"domain gap {value:.3f}: measurable (noise {noise_floor:.3f}) but below the warning level"
    else:
        message = f"domain gap {value:.3f}: within the source's own sampling noise ({noise_floor:.3f})"
    return GapResult(
        score=value,
        noise_floor=noise_floor,
        noise_mean=float(np.mean(null)),
        warn_level=warn_level,
        warning=warning,
        n_source=len(source),
        n_target=len(target),
        sample_size=m,
        dims=k,
        message=message,
    )


def image_gap(
    net: nn.Module,
    source: Sequence[Path | np.ndarray],
    target: Sequence[Path | np.ndarray],
    config: GapConfig = GapConfig(),
    target_net: nn.Module | None = None,
    batch_size: int = 32,
) -> GapResult:
    """Gap between image sets; `target_net` (e.g. the adapted copy) computes the target features if given,
    so the score says how far the features the head receives on target lie from what it was trained on."""
    fs, _, _ = features_and_scores(net, source, batch_size)
    ft, _, _ = features_and_scores(target_net or net, target, batch_size)
    return domain_gap(fs, ft, config)
