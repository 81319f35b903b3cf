"""Rates with 95 % intervals, per photo and per physical part (numpy and the standard library only).

The real set photographs each part tens of times, so photos are not independent: 2,875 good photos of 41 good
parts prove about as much as 41 parts do. Every rate is therefore reported twice:

- per photo: share of photos, interval from a bootstrap over parts (resampling whole parts keeps the
  correlation between a part's photos), plus Wilson on the photo counts for reference;
- per part: the mean over parts of the share of each part's photos that are misjudged (what the line does
  with one photo of each part), interval from the same bootstrap; and the share of parts *mostly* misjudged
  (more than half their photos), with an exact Clopper-Pearson interval on the part counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (n = 0 gives the uninformative (0, 1))."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for n in the tens of thousands)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _bisect(f, lo: float, hi: float, iters: int = 80) -> float:
    """Root of a monotone f on [lo, hi]."""
    flo = f(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) == (flo > 0):
            lo, flo = mid, f(mid)
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for k successes in n trials; the same numbers as
    `scipy.stats.binomtest(k, n).proportion_ci(method="exact")`."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is not within 0..n={n}")
    alpha = 1.0 - confidence
    lower = 0.0 if k == 0 else _bisect(lambda p: (1.0 - _binom_cdf(k - 1, n, p)) - alpha / 2, 0.0, 1.0)
    upper = 1.0 if k == n else _bisect(lambda p: _binom_cdf(k, n, p) - alpha / 2, 0.0, 1.0)
    return lower, upper


@dataclass(frozen=True)
class Rate:
    """A rate with its counts and 95 % interval (`basis` names how the interval was made)."""

    value: float
    k: float  # numerator: photos, parts, or (per part) the sum of per-part shares
    n: int  # denominator: photos or parts
    low: float
    high: float
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.value:.2f} % [{100 * self.low:.2f}, {100 * self.high:.2f}]"


def _bootstrap(values: np.ndarray, weights: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of sum(values) / sum(weights) over parts resampled with replacement."""
    n = values.size
    if n == 0 or n_boot <= 0:
        return (0.0, 1.0) if n == 0 else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    num, den = values[idx].sum(axis=1), weights[idx].sum(axis=1)
    ratio = np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)
    lo, hi = np.quantile(ratio, [0.025, 0.975])
    return float(lo), float(hi)


def part_rates(
    hits: Sequence[bool] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Rate]:
    """Rates of `hits` (e.g. "this good photo was rejected") over photos and over the parts `groups` names.

    Returns `photo` (share of photos, bootstrap over parts), `photo_wilson` (same share, Wilson on photo
    counts: too narrow when photos of a part agree), `part` (mean per-part share, bootstrap over parts) and
    `part_mostly` (share of parts with more than half their photos hit, Clopper-Pearson on part counts).
    """
    hits = np.asarray(hits, dtype=bool)
    groups = np.asarray(groups)
    if hits.shape != groups.shape:
        raise ValueError(f"hits {hits.shape} and groups {groups.shape} differ in length")
    _, inverse = np.unique(groups, return_inverse=True)
    per_part_hits = np.bincount(inverse, weights=hits.astype(np.float64))
    per_part_n = np.bincount(inverse).astype(np.float64)
    n_photos, n_parts = int(hits.size), int(per_part_n.size)
    k_photos = int(hits.sum())
    share = np.divide(per_part_hits, per_part_n, out=np.zeros_like(per_part_hits), where=per_part_n > 0)
    mostly = int((share > 0.5).sum())
    photo_value = k_photos / n_photos if n_photos else 0.0
    part_value = float(share.mean()) if n_parts else 0.0
    return {
        "photo": Rate(
            photo_value,
            k_photos,
            n_photos,
            *_bootstrap(per_part_hits, per_part_n, n_boot, seed),
            "bootstrap over parts",
        ),
        "photo_wilson": Rate(photo_value, k_photos, n_photos, *wilson_interval(k_photos, n_photos), "wilson on photos"),
        "part": Rate(
            part_value,
            float(share.sum()),
            n_parts,
            *_bootstrap(share, np.ones_like(share), n_boot, seed),
            "bootstrap over parts",
        ),
        "part_mostly": Rate(
            mostly / n_parts if n_parts else 0.0,
            mostly,
            n_parts,
            *clopper_pearson_interval(mostly, n_parts),
            "clopper-pearson on parts",
        ),
    }
