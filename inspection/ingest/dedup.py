"""Near-duplicate grouping, invariant to rotation by any angle, mirroring, zoom and shift.

The real set holds many rotated, mirrored, zoomed and shifted copies of the same photo of a part; if those
landed on both sides of a split, the test score would measure memory. Every impeller has a dark vane cavity
whose outer edge is a circle (an ellipse when the part is tilted): its centre and radius, fitted to sub-pixel
edge points, fix the part's axis and scale. The image is unwrapped to polar coordinates around that centre, with
radii in units of the cavity radius (rows = angle, columns = radius), so a rotation of the photo becomes a
circular shift along the angle, a mirror image a reversal of the angle, and a zoom or shift changes nothing.

1. candidates: per radius band, the magnitude of the Fourier transform along the angle ignores both shift and
   reversal; nearby descriptors (cosine, k nearest neighbours) are candidates. All these impellers look
   alike, so this only proposes pairs.
2. verification: each polar image keeps only its angular structure above the lighting (harmonics > 2, every
   ring scaled to unit variance, so the rim's marks count as much as the bright flange); two parts are aligned
   over every rotation at once by FFT cross-correlation along the angle, mirrored and not, and scored by the
   best normalised correlation (1.0 = identical).
3. linkage: a verified pair of singletons joins; two larger groups join only when most of their members (a
   sample of each) verify against each other directly (median linkage). One look-alike pair can therefore
   not chain two different parts' groups together.

On the real set (6,633 photos): 300 real photos rotated/mirrored/zoomed ±15 %/shifted ±8 %/re-JPEGed score
≥ 0.86 against their original for 99 % (median 0.97); random pairs from different groups score ≤ 0.70 for
99 %. The set holds ~220 parts, each photographed or augmented many times (groups up to ~300 images, whose
random member pairs score ≥ 0.73-0.95 at the 5th percentile): large groups there are real, not chaining.

Parts without such a cavity (flat tiles, plates) take the general method of `inspection.ingest.dedup_general`
(aligned on the part's outline, compared by texture): `features` picks per image, by whether a cavity is found
whose rim lies on its fitted ellipse and whose surrounding ring is bright (`CAVITY_MIN_SHARE`,
`CAVITY_MIN_CONTRAST`), and says which in `Features.method`. Each method groups its own images; the linkage
below is shared.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np

from inspection.ingest import dedup_general

logger = logging.getLogger(__name__)

IMPELLER, GENERAL = "impeller", "general"
METHODS = (IMPELLER, GENERAL)  # the index is the method's code in the stored descriptor
# the impeller method is used where a cavity is found with at least this share of its rim on the fitted ellipse
# and the ring around it this much brighter than its inside (image standard deviations): all 6,633 real photos
# ≥ 0.55 and ≥ 1.2, demo castings ≥ 0.71 and ≥ 1.7; the 1 in 130 demo-tile photos whose dark patch passes the
# share has a contrast ≤ 0.7
CAVITY_MIN_SHARE = 0.45
CAVITY_MIN_CONTRAST = 0.95

_N_ANGLE = 128  # angular samples of the polar unwrap (2.8° each: the correlation peak is ~3 samples wide)
_N_RADIUS = 32  # radial samples between _R_INNER and _R_OUTER
_R_INNER, _R_OUTER = 0.5, 2.0  # unwrap radii in cavity radii: from the bore's ring to just past the flange edge
_LOW_HARMONICS = 2  # angular harmonics 0..2 removed before verification: lighting and tilt, shared by all parts
_N_FREQ = 12  # angular harmonics kept per radius band in the descriptor
_BANDS = 8  # radius bands of the descriptor
_LINK_SAMPLE = 8  # members of each group compared when two groups may merge
_EDGE_SEARCH = 0.12  # the sub-pixel edge is searched within ±12 % of the first radius estimate
_BLUR = 1.5  # pixels of blur before sampling, for a cavity radius of 70 px: limits aliasing between rotations

DESCRIPTOR_DIM = _N_FREQ * _BANDS + _N_RADIUS  # harmonic magnitudes + the radial profile
_OUTLINE_SIDE = 160  # the threshold outline is found on a copy this small (then refined at full size)
_GOOD_EDGE = 0.7  # share of rays on the fitted edge above which the fast estimate is trusted
_OPEN_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))  # cuts the groove's thin bridges


def _fit_ellipse(points: np.ndarray) -> tuple[float, float, float, float]:
    """(cx, cy, radius, inlier share) of an ellipse fitted to `points` (N, 2), outliers trimmed twice."""
    pts = points.astype(np.float32)
    ellipse = cv2.fitEllipse(pts)
    res = np.zeros(len(pts), np.float32)
    for _ in range(3):
        (cx, cy), (a, b), ang = ellipse
        t = np.deg2rad(ang)
        dx, dy = pts[:, 0] - cx, pts[:, 1] - cy
        u = (dx * np.cos(t) + dy * np.sin(t)) / max(a / 2, 1e-3)
        v = (-dx * np.sin(t) + dy * np.cos(t)) / max(b / 2, 1e-3)
        radius = float(np.sqrt(max(a * b, 1e-6)) / 2)
        res = np.abs(np.hypot(u, v) - 1.0) * radius  # ~ pixels off the ellipse
        keep = res < max(0.8, 2.5 * float(np.median(res)))
        if keep.sum() < 10 or keep.all():
            break
        ellipse = cv2.fitEllipse(pts[keep])
    (cx, cy), (a, b), _ = ellipse
    radius = float(np.sqrt(max(a * b, 1e-6)) / 2)
    return float(cx), float(cy), radius, float(np.mean(res < max(1.5, 0.03 * radius)))


def _cavity_outline(grey: np.ndarray) -> tuple[float, float, float] | None:
    """First estimate of the cavity's ellipse from a dark-region threshold, or None when there is none."""
    h, w = grey.shape
    blur = cv2.GaussianBlur(grey, (5, 5), 0)
    cumulative = np.cumsum(np.bincount(blur.ravel(), minlength=256)) / blur.size
    best: tuple[float, float, float, float] | None = None
    for pct in (0.20, 0.12):  # 12 %: when the cavity touches the dark groove around it at 20 %
        dark = (blur <= int(np.searchsorted(cumulative, pct))).astype(np.uint8)
        dark = cv2.morphologyEx(dark, cv2.MORPH_OPEN, _OPEN_KERNEL)  # cut thin bridges to the groove
        n, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=8)
        for i in range(1, n):
            x, y, bw, bh, area = stats[i]
            if x == 0 or y == 0 or x + bw >= w or y + bh >= h or area < 0.01 * h * w:
                continue
            contours, _ = cv2.findContours((labels == i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            pts = max(contours, key=cv2.contourArea)[:, 0, :]
            if len(pts) < 20:
                continue
            cx, cy, r, share = _fit_ellipse(pts)
            if not (0.12 * min(h, w) < r < 0.4 * min(h, w) and 0 < cx < w and 0 < cy < h):
                continue
            # a filled disc (minus the bore) on an ellipse: not a crescent of shadow or a groove
            score = share * min(1.0, area / (0.6 * np.pi * r * r))
            if best is None or score > best[3]:
                best = (cx, cy, r, score)
        if best is not None and best[3] > 0.7:
            break
    return None if best is None else best[:3]


def _outline_at(grey: np.ndarray, side: int) -> tuple[float, float, float] | None:
    h, w = grey.shape
    scale = min(1.0, side / min(h, w))
    if scale >= 1.0:
        return _cavity_outline(grey)
    small = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    found = _cavity_outline(small)
    return None if found is None else (found[0] / scale, found[1] / scale, found[2] / scale)


def _refine_on_edge(grey: np.ndarray, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """Ellipse through the sub-pixel dark-to-bright edge found along 180 rays near radius `r`.

    A threshold outline moves with brightness and JPEG noise; the steepest-gradient point of each ray does
    not, which makes the centre repeatable to ~0.1 px between copies (99 % within 0.4 px on the real set).
    Returns (cx, cy, r, share of rays whose edge lies on the fitted ellipse).
    """
    g = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 1.0)
    n_rays, n_steps = 180, 40
    theta = np.arange(n_rays) * 2 * np.pi / n_rays
    radii = r * np.linspace(1 - _EDGE_SEARCH, 1 + _EDGE_SEARCH, n_steps)
    mx = (cx + np.cos(theta)[:, None] * radii).astype(np.float32)
    my = (cy + np.sin(theta)[:, None] * radii).astype(np.float32)
    profile = cv2.remap(g, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    d = np.diff(profile, axis=1)  # outward derivative, (rays, steps-1)
    k = np.clip(np.argmax(d, axis=1), 1, n_steps - 3)
    rows = np.arange(n_rays)
    y0, y1, y2 = d[rows, k - 1], d[rows, k], d[rows, k + 1]
    den = y0 - 2 * y1 + y2
    safe = np.abs(den) > 1e-6
    offset = np.where(safe, 0.5 * (y0 - y2) / np.where(safe, den, 1.0), 0.0)  # parabolic peak
    rad = np.interp(k + 0.5 + np.clip(offset, -1, 1), np.arange(n_steps), radii)
    pts = np.c_[cx + np.cos(theta) * rad, cy + np.sin(theta) * rad]
    strong = y1 > np.percentile(y1, 25)  # rays crossing a defect or glare have a weak edge
    if strong.sum() < 20:
        return cx, cy, r, 0.0
    ncx, ncy, nr, share = _fit_ellipse(pts[strong])
    if abs(nr / r - 1) > 0.1 or np.hypot(ncx - cx, ncy - cy) > 0.1 * r:
        return cx, cy, r, 0.0  # the edge search wandered off: keep the outline's estimate
    return ncx, ncy, nr, share * strong.mean()


def locate_cavity(grey: np.ndarray) -> tuple[float, float, float, float] | None:
    """(cx, cy, cavity radius, share of its rim on the fitted ellipse) in pixels of `grey` (H, W) uint8, or None
    when no dark round cavity is found."""
    h, w = grey.shape
    best: tuple[float, float, float, float] | None = None
    # a small copy is fast and usually right; the full image settles the rare doubtful case
    for side in (_OUTLINE_SIDE, max(h, w)):
        outline = _outline_at(grey, side)
        if outline is not None:
            fit = _refine_on_edge(grey, *outline)
            if best is None or fit[3] > best[3]:
                best = fit
            if best[3] >= _GOOD_EDGE:
                break
    return best


def cavity_contrast(grey: np.ndarray, cx: float, cy: float, r: float) -> float:
    """(mean of the ring 1.08-1.35 r) - (mean inside 0.65-0.92 r: outside the hub), in image standard deviations."""
    theta = np.arange(64) * 2 * np.pi / 64
    radii = r * np.r_[np.linspace(0.65, 0.92, 5), np.linspace(1.08, 1.35, 5)]
    mx = (cx + np.cos(theta)[:, None] * radii).astype(np.float32)
    my = (cy + np.sin(theta)[:, None] * radii).astype(np.float32)
    ring = cv2.remap(grey, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    return float((ring[:, 5:].mean() - ring[:, :5].mean()) / (grey.std() + 1e-6))


def find_centre(grey: np.ndarray) -> tuple[float, float, float]:
    """The part's axis and scale: (cx, cy, cavity radius) in pixels of `grey` (H, W) uint8.

    Falls back to the image centre and a typical radius when no cavity is found (e.g. a blank image).
    """
    h, w = grey.shape
    best = locate_cavity(grey)
    if best is None:
        return (w - 1) / 2.0, (h - 1) / 2.0, 0.23 * min(h, w)
    return best[:3]


def polar_unwrap(grey: np.ndarray, centre: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(angle, radius) float32 image around the part's axis, radii in cavity radii (scale-free), and a bool mask
    of the samples inside the frame (a zoomed or shifted copy loses part of the flange).

    `centre`: (cx, cy, radius) when already located (else `find_centre`)."""
    cx, cy, r = centre if centre is not None else find_centre(grey)
    theta = np.arange(_N_ANGLE) * 2 * np.pi / _N_ANGLE
    radii = r * np.linspace(_R_INNER, _R_OUTER, _N_RADIUS)
    mx = (cx + np.cos(theta)[:, None] * radii).astype(np.float32)
    my = (cy + np.sin(theta)[:, None] * radii).astype(np.float32)
    # the flange covers several pixels per angular sample at 300 px: area-average first so it does not alias
    src = cv2.GaussianBlur(grey, (0, 0), _BLUR * r / 70.0).astype(np.float32)
    polar = cv2.remap(src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    h, w = grey.shape
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return polar, inside


def descriptor_from_polar(polar: np.ndarray) -> np.ndarray:
    """Rotation/flip-invariant descriptor, float32 (DESCRIPTOR_DIM,), unit length."""
    p = (polar - polar.mean()) / (polar.std() + 1e-6)  # brightness/contrast changes are not a new part
    bands = p.reshape(_N_ANGLE, _BANDS, _N_RADIUS // _BANDS).mean(axis=2)  # (angle, band)
    spectrum = np.abs(np.fft.rfft(bands, axis=0))[1 : _N_FREQ + 1] / _N_ANGLE  # (freq, band)
    harmonics = np.log1p(spectrum * 8.0).T.reshape(-1)
    profile = p.mean(axis=0) * 0.25  # radial profile: invariant too; scaled to weigh like the harmonics
    feat = np.concatenate([harmonics, profile]).astype(np.float32)
    feat -= feat.mean()
    return feat / (np.linalg.norm(feat) + 1e-9)


def signature_from_polar(polar: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
    """Angular structure of each ring above the lighting, rings at unit variance, unit norm, float16 (angle, radius).

    Samples outside the frame (`inside` False) are zero: what a copy cannot see must not count against it.
    """
    if inside is not None and not inside.all():
        counts = inside.sum(axis=0)
        ring_mean = (polar * inside).sum(axis=0) / np.maximum(counts, 1)
        polar = np.where(inside, polar, ring_mean)  # no step at the frame's edge for the high-pass to spread
    spec = np.fft.rfft(polar, axis=0)
    spec[: _LOW_HARMONICS + 1] = 0.0
    sig = np.fft.irfft(spec, n=_N_ANGLE, axis=0)
    # rings of plain metal have almost no structure: the floor keeps their noise from being blown up
    sig /= sig.std(axis=0, keepdims=True) + 0.05 * sig.std() + 1e-6
    if inside is not None:
        sig *= inside
    return (sig / (np.linalg.norm(sig) + 1e-9)).astype(np.float16)


class Features(NamedTuple):
    """Near-duplicate features of one image, by the method `features` picked for it."""

    descriptor: np.ndarray  # float32, unit: DESCRIPTOR_DIM (impeller) or dedup_general.DESCRIPTOR_DIM
    signature: Any  # impeller: float16 (angle, radius); general: dedup_general.Signature
    method: str  # IMPELLER or GENERAL


def features(rgb: np.ndarray, method: str | None = None) -> Features:
    """Near-duplicate features of one RGB/grey uint8 image: the impeller method where its cavity is found,
    the general one otherwise (or the `method` given: a stored image's signature recomputed by its method)."""
    grey = np.ascontiguousarray(rgb[:, :, 0] if rgb.ndim == 3 else rgb)  # decode gives grey as 3 equal channels
    centre: tuple[float, float, float] | None = None
    if method is None:
        method = GENERAL
        cavity = locate_cavity(grey)
        if cavity is not None and cavity[3] >= CAVITY_MIN_SHARE:
            cx, cy, r, _ = cavity
            if cavity_contrast(grey, cx, cy, r) >= CAVITY_MIN_CONTRAST:
                method, centre = IMPELLER, (cx, cy, r)
    if method == GENERAL:
        sig = dedup_general.signature(grey)
        return Features(dedup_general.descriptor(sig), sig, GENERAL)
    if method != IMPELLER:
        raise ValueError(f"near-duplicate method {method!r}; allowed: {', '.join(METHODS)}")
    polar, inside = polar_unwrap(grey, centre)
    return Features(descriptor_from_polar(polar), signature_from_polar(polar, inside), IMPELLER)


def stored_vector(f: Features) -> np.ndarray:
    """What the manifest keeps per image: [method code, descriptor...] float32 (the method travels with it)."""
    return np.concatenate([[float(METHODS.index(f.method))], f.descriptor]).astype(np.float32)


def from_stored(vector: np.ndarray | None) -> tuple[str, np.ndarray] | None:
    """(method, descriptor) of a stored vector, or None when it is missing or from an older version (recompute)."""
    if vector is None or len(vector) < 2:
        return None
    code, desc = int(round(float(vector[0]))), vector[1:]
    dims = {IMPELLER: DESCRIPTOR_DIM, GENERAL: dedup_general.DESCRIPTOR_DIM}
    if not 0 <= code < len(METHODS) or len(desc) != dims[METHODS[code]]:
        return None  # older stores kept the impeller descriptor alone (DESCRIPTOR_DIM values, no code)
    return METHODS[code], desc


def spectrum(sig: np.ndarray) -> np.ndarray:
    """Angular FFT of a signature, complex64 (angle // 2 + 1, radius): computed once per image."""
    return np.fft.rfft(sig.astype(np.float32), axis=0).astype(np.complex64)


def similarities_from_spectra(fa: np.ndarray, fb: np.ndarray, n_angle: int = _N_ANGLE) -> np.ndarray:
    """Best correlation of spectrum `fa` (F, R) with each of `fb` (M, F, R) over all rotations, mirrored or not.

    Straight: the cross-correlation fa·conj(fb). Mirrored (angle reversed): the convolution fa·fb, whose
    peak over all shifts is the same as that of the correlation with the reversed signature.
    """
    if len(fb) == 0:
        return np.zeros(0, np.float32)
    straight = np.fft.irfft(np.einsum("fr,mfr->mf", fa, fb.conj()), n=n_angle, axis=1)
    mirrored = np.fft.irfft(np.einsum("fr,mfr->mf", fa, fb), n=n_angle, axis=1)
    return np.maximum(straight.max(axis=1), mirrored.max(axis=1)).astype(np.float32)


def aligned_similarities(a: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Best normalised correlation of signature `a` with each of `others` (M, angle, radius) over every rotation,
    mirrored or not: (M,) float32, 1.0 = identical."""
    if len(others) == 0:
        return np.zeros(0, np.float32)
    fb = np.fft.rfft(np.asarray(others, np.float32), axis=1)
    return similarities_from_spectra(spectrum(a), fb, a.shape[0])


def aligned_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Best normalised correlation of two signatures over every rotation, mirrored or not (1.0 = identical)."""
    return float(aligned_similarities(a, b[None])[0])


def candidate_pairs(descriptors: np.ndarray, max_distance: float, k: int, block: int = 1024) -> list[tuple[int, int]]:
    """Pairs (i < j) among each row's `k` nearest descriptors within cosine distance `max_distance`."""
    n = len(descriptors)
    v = np.ascontiguousarray(descriptors, dtype=np.float32)
    pairs: set[tuple[int, int]] = set()
    k = min(k, n - 1)
    if k <= 0:
        return []
    for start in range(0, n, block):
        sims = v[start : start + block] @ v.T  # (b, N)
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -2.0  # not its own neighbour
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        close = 1.0 - np.take_along_axis(sims, nearest, axis=1) <= max_distance
        for r, j in zip(*np.nonzero(close), strict=True):
            i, jj = start + int(r), int(nearest[r, j])
            pairs.add((min(i, jj), max(i, jj)))
    return sorted(pairs)


def score_pairs(pairs: list[tuple[int, int]], spectrum_of: Callable[[int], np.ndarray]) -> np.ndarray:
    """Aligned similarity of each pair (i, j), batched per first index: (len(pairs),) float32.

    `spectrum_of(i)` gives `spectrum(signature of i)`."""
    scores = np.zeros(len(pairs), np.float32)
    by_first: dict[int, list[int]] = {}
    for n, (i, _) in enumerate(pairs):
        by_first.setdefault(i, []).append(n)
    for i, idx in by_first.items():
        others = np.stack([spectrum_of(pairs[n][1]) for n in idx])
        scores[idx] = similarities_from_spectra(spectrum_of(i), others)
    return scores


def _spread(members: list[int], m: int) -> list[int]:
    if len(members) <= m:
        return members
    return [members[int(round(t))] for t in np.linspace(0, len(members) - 1, m)]


def group_near_duplicates(
    descriptors: np.ndarray,
    signature: Callable[[int], np.ndarray],
    max_distance: float,
    min_similarity: float,
    k: int = 24,
) -> np.ndarray:
    """Group label (index of its first member) for each row of `descriptors` (N, D), impeller method.

    `signature(i)` returns row i's signature (may load it lazily). Candidates are the `k` nearest descriptors
    within cosine distance `max_distance`; a pair verifies when its aligned signatures correlate
    ≥ `min_similarity`. Verified pairs are taken strongest first; two groups join only when the median
    similarity between samples of their members is ≥ `min_similarity` as well (see the module docstring).
    """
    cache: dict[int, np.ndarray] = {}

    def spec(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = spectrum(signature(i))
        return cache[i]

    def cross(a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        others = np.stack([spec(j) for j in b])
        return np.concatenate([similarities_from_spectra(spec(i), others) for i in a])

    pairs = candidate_pairs(descriptors, max_distance, k)
    return link_pairs(len(descriptors), pairs, score_pairs(pairs, spec), cross, min_similarity)


def group_general(
    descriptors: np.ndarray,
    signature: Callable[[int], dedup_general.Signature],
    max_distance: float,
    min_similarity: float,
    k: int = 24,
) -> np.ndarray:
    """`group_near_duplicates` for the general method: the same candidates and linkage, scored by
    `dedup_general.similarities` (the outline-aligned texture correlation)."""
    cache: dict[int, dedup_general.Signature] = {}

    def sig(i: int) -> dedup_general.Signature:
        if i not in cache:
            cache[i] = signature(i)
        return cache[i]

    def cross(a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        others = [sig(j) for j in b]
        return np.concatenate([dedup_general.similarities(sig(i), others) for i in a])

    pairs = candidate_pairs(descriptors, max_distance, k)
    scores = np.zeros(len(pairs), np.float32)
    by_first: dict[int, list[int]] = {}
    for n, (i, _) in enumerate(pairs):
        by_first.setdefault(i, []).append(n)
    for i, idx in by_first.items():
        scores[idx] = dedup_general.similarities(sig(i), [sig(pairs[n][1]) for n in idx])
    return link_pairs(len(descriptors), pairs, scores, cross, min_similarity)


def link_pairs(
    n: int,
    pairs: list[tuple[int, int]],
    scores: np.ndarray,
    cross: Callable[[Sequence[int], Sequence[int]], np.ndarray],
    min_similarity: float,
) -> np.ndarray:
    """Group labels from scored candidate pairs: strongest first, groups join by median linkage.

    `cross(a, b)` scores every member index in `a` against every one in `b` (flattened)."""
    parent = np.arange(n)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    refused = 0
    for p in np.argsort(-scores, kind="stable"):
        if scores[p] < min_similarity:
            break
        a, b = find(pairs[p][0]), find(pairs[p][1])
        if a == b:
            continue
        if len(members[a]) > 1 or len(members[b]) > 1:
            if len(members[a]) > len(members[b]):
                a, b = b, a  # sample the smaller group's members against the larger group's
            linked = cross(_spread(members[a], _LINK_SAMPLE // 2), _spread(members[b], _LINK_SAMPLE))
            if float(np.median(linked)) < min_similarity:
                refused += 1
                continue
        keep, gone = min(a, b), max(a, b)
        parent[gone] = keep
        members[keep].extend(members.pop(gone))
    logger.debug(
        "near-duplicates: %d candidate pairs, %d verified, %d group merges refused",
        len(pairs),
        int((scores >= min_similarity).sum()),
        refused,
    )
    return np.array([find(i) for i in range(n)])
