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
        maps = net.feature_maps_all(x)
        feats.append(net.pooled_of(maps).numpy())  # (B, D): what the head and the type head read
        probs.append(torch.sigmoid(net.logits_from_maps(maps)).numpy())  # as the head pools them (mean or lse)
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
    noise_floor: float  # 95th percentile of the score between halves of the source (same sample size)
    noise_mean: float
    warn_level: float  # max(warn_factor * noise_floor, min_warn_level)
    warning: bool  # score > warn_level: transfer is unreliable
    n_source: int
    n_target: int
    sample_size: int  # images per side in each comparison
    dims: int  # principal directions used
    message: str
    halves: str = "random"  # how the source was halved for the noise floor: "parts" (whole groups) or "random"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _halves(n: int, groups: Sequence[str] | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of range(n): whole groups on each side when groups are given, else a random split."""
    if groups is None:
        perm = rng.permutation(n)
        return perm[: n // 2], perm[n // 2 :]
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    first: list[int] = []
    second: list[int] = []
    for g in rng.permutation(sorted(members)):  # random order of parts; fill the first half to n/2 images
        (first if len(first) < n // 2 else second).extend(members[g])
    return np.array(first), np.array(second)


def domain_gap(
    source: np.ndarray,
    target: np.ndarray,
    config: GapConfig = GapConfig(),
    source_groups: Sequence[str] | None = None,
) -> GapResult:
    """Gap score between source features (n, C) and target features (m, C), with its calibrated warning level.

    The warning level is a multiple of the score between two halves of the source. With `source_groups` (the
    near-duplicate group of each source image, i.e. the physical part) the halves hold different parts, as a
    new batch from the same line would; random halves share parts (each is photographed many times) and
    understate how much two sets of the same domain differ, so new parts of the same line would warn."""
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise DataError(f"features must be (n, C) and (m, C) with the same C; got {source.shape} and {target.shape}")
    if len(source) < 8 or len(target) < 4:
        raise DataError(
            f"too few images for a gap score: {len(source)} source, {len(target)} target; allowed >= 8 and >= 4"
        )
    rng = np.random.default_rng(config.seed)
    if source_groups is not None:
        if len(source_groups) != len(source):
            raise DataError(f"source_groups: got {len(source_groups)} for {len(source)} source images")
        if len(set(source_groups)) < 4:
            source_groups = None  # too few parts to halve by part: random halves, and the result says so
    splits = [_halves(len(source), source_groups, rng) for _ in range(config.calibration_splits)]
    # equal sizes on both sides, no larger than the smallest half, so the half-split calibration is like for like
    m = min(len(target), config.max_images, *(min(len(a), len(b)) for a, b in splits))
    if m < 4:
        raise DataError(f"too few images per half for a gap score: {m}; need >= 4 (more source images or parts)")
    scale = float(source.var(axis=0).sum()) or 1.0  # source total variance: makes the score unit-free
    k = min(config.pca_dim, m - 1)

    def score(a: np.ndarray, b: np.ndarray) -> float:
        return frechet_distance(a, b, pca_dim=k, shrinkage=config.shrinkage) / scale

    gaps, null = [], []
    for a, b in splits:
        a, b = rng.choice(a, size=m, replace=False), rng.choice(b, size=m, replace=False)
        null.append(score(source[a], source[b]))
        gaps.append(score(source[a], target[rng.choice(len(target), size=m, replace=False)]))
    noise_floor = float(np.quantile(null, 0.95))
    warn_level = max(config.warn_factor * noise_floor, config.min_warn_level)
    value = float(np.mean(gaps))
    warning = value > warn_level
    halves = "parts" if source_groups is not None else "random"
    if warning:
        message = (
            f"domain gap {value:.3f} is above the warning level {warn_level:.3f} "
            f"({config.warn_factor:g} x the source's own half-split noise {noise_floor:.3f}, {halves} halves): "
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
        halves=halves,
    )


def image_gap(
    net: nn.Module,
    source: Sequence[Path | np.ndarray],
    target: Sequence[Path | np.ndarray],
    config: GapConfig = GapConfig(),
    target_net: nn.Module | None = None,
    batch_size: int = 32,
    source_groups: Sequence[str] | None = None,
) -> GapResult:
    """Gap between image sets; `target_net` (e.g. the adapted copy) computes the target features if given,
    so the score says how far the features the head receives on target lie from what it was trained on.
    `source_groups` (the part of each source image) makes the warning level come from halves by part."""
    fs, _, _ = features_and_scores(net, source, batch_size)
    ft, _, _ = features_and_scores(target_net or net, target, batch_size)
    return domain_gap(fs, ft, config, source_groups)
