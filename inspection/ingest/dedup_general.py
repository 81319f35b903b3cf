"""Near-duplicate signatures for parts without a round cavity: aligned on the part's outline, then on its texture.

The impeller method (`inspection.ingest.dedup`) centres on a dark circular cavity. A flat part (a ferrite tile, a
plate, a label) has none, but it has an outline: re-shots of one part differ by how it lies (turned by any angle,
either side up), a small shift and zoom, and the light. So:

1. outline: the part is segmented from its fixture (Otsu on a small copy, the region under the frame centre);
   when that region is a filled rectangle its rotated bounding box is turned upright and cropped, which removes
   any rotation angle, shift and zoom; otherwise (the part fills the frame, as in an ROI crop) the frame is used.
   An inset of `_INSET` per side keeps the edges (fixture, chamfer) out: every part has them alike.
2. pose: the upright crop is turned landscape, leaving the 4 symmetries of a rectangle (turned 180°, mirrored
   either way) or, for a near-square part, the 8 of a square.
3. signature: a band-pass of the surface (structure 1-8 px on a 90x90 grid), robustly scaled and clipped so one
   strong blowhole cannot decide a comparison; two parts are compared under each symmetry by phase correlation
   (the shift) and normalised cross-correlation over the overlap: the best is the score (1.0 = identical).
4. candidates: a descriptor that does not change under those symmetries (the projections of a 24x24 thumbnail
   on the symmetry group's characters, taken up to sign), so plain cosine neighbours propose pairs.

Demo tiles (`inspection.synth_tile`: 960 photos, 3 re-shots of each of 320 tiles, varied sizes or all one size):
re-shots of one tile score ≥ 0.73 (median 0.96), different tiles ≤ 0.32; a tile's other shots are always its
nearest descriptors; ~1 ms a signature, 0.2-0.6 ms a pair. Ingest of those 960 photos: 320 groups, every pair
right, 6 s. Local features (ORB + RANSAC similarity, on a mirrored copy too) were tried first and are not reliable
on such fine granular texture: 3-10 % of re-shot pairs found < 10 inliers, at 4-17 ms a pair. Parts lying at any
angle are aligned by their outline (tests/unit/test_dedup_general.py); a part that fills the frame must be turned
by multiples of 90° (a tilt of a few degrees is absorbed by the shift search).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

_GRID = 90  # side of the band image: the upright crop is resized to a square, so every pose is defined
_SQUARE_ASPECT = 1.3  # below this long/short ratio a part's 90° turns cannot be told apart by its outline
_INSET = 0.12  # cropped from each side of the part: edges look alike on every part (and jitter with the outline)
_BAND = (1.0, 8.0)  # band-pass sigmas on the grid: above sensor noise, below lighting gradients
_CLIP = 2.5  # robust sigmas: a blowhole or chip must not dominate the correlation
_MAX_SHIFT = 0.08  # of the grid, after the outline alignment (when the frame is used: ROI jitter)
_ASPECT_TOL = 0.1  # |log aspect ratio| difference above which two crops cannot show the same part
_THUMB = 24  # side of the descriptor's thumbnail
DESCRIPTOR_DIM = 3 * (_THUMB // 2) ** 2


@dataclass(frozen=True)
class Signature:
    band: np.ndarray  # float16 (_GRID, _GRID): the upright, landscape crop resized; zero mean, unit variance
    aspect: float  # long / short side of the upright crop
    outlined: bool  # the part's outline was found (False: the frame was used)

    @property
    def squarish(self) -> bool:
        return self.aspect < _SQUARE_ASPECT


def _upright(grey: np.ndarray) -> tuple[np.ndarray, bool]:
    """The part turned upright and cropped to its outline, or the whole frame when no rectangular outline."""
    h, w = grey.shape
    scale = min(1.0, 256 / max(h, w))
    small = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (5, 5), 0)
    _, binary = cv2.threshold(small, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    sh, sw = small.shape
    best = None
    for polarity in (binary, 1 - binary):  # the part may be brighter or darker than its fixture
        n, labels, stats, _ = cv2.connectedComponentsWithStats(polarity.astype(np.uint8), connectivity=4)
        label = labels[sh // 2, sw // 2]
        if label == 0:
            continue
        area = stats[label, cv2.CC_STAT_AREA]
        if not 0.25 * sh * sw <= area <= 0.985 * sh * sw:
            continue  # a speck, or the whole frame (then there is no outline to align on)
        contours, _ = cv2.findContours((labels == label).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        (cx, cy), (rw, rh), angle = cv2.minAreaRect(max(contours, key=cv2.contourArea))
        if rw * rh <= 0 or area / (rw * rh) < 0.85:
            continue  # not a filled rectangle: its bounding box would not be repeatable
        best = (cx / scale, cy / scale, rw / scale, rh / scale, angle)
        break
    if best is None:
        return grey, False
    cx, cy, rw, rh, angle = best
    out_w, out_h = max(8, round(rw)), max(8, round(rh))
    m = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    m[:, 2] += (out_w / 2 - cx, out_h / 2 - cy)
    return cv2.warpAffine(grey, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), True


def _robust_unit(x: np.ndarray) -> np.ndarray:
    mad = float(np.median(np.abs(x - np.median(x)))) * 1.4826
    x = np.clip(x / (mad + 1e-6), -_CLIP, _CLIP)
    x = x - x.mean()
    return x / (x.std() + 1e-6)


def signature(grey: np.ndarray) -> Signature:
    """The rotation/flip-normalised band image of one grey uint8 frame (H, W)."""
    part, outlined = _upright(np.ascontiguousarray(grey))
    h, w = part.shape
    dy, dx = int(h * _INSET), int(w * _INSET)
    part = part[dy : h - dy, dx : w - dx] if h - 2 * dy >= 8 and w - 2 * dx >= 8 else part
    h, w = part.shape
    if h > w:
        part = np.ascontiguousarray(np.rot90(part))
        h, w = w, h
    aspect = w / h
    # squashed to a square: the same for every photo of one part, and a 90° turn then keeps the grid
    t = cv2.resize(part, (_GRID, _GRID), interpolation=cv2.INTER_AREA).astype(np.float32)
    band = cv2.GaussianBlur(t, (0, 0), _BAND[0]) - cv2.GaussianBlur(t, (0, 0), _BAND[1])
    return Signature(_robust_unit(band).astype(np.float16), float(aspect), outlined)


def _components(t: np.ndarray) -> list[np.ndarray]:
    """Projections of `t` on the characters of the rectangle's symmetry group {1, rot180, hflip, vflip}."""
    r, hf, vf = t[::-1, ::-1], t[:, ::-1], t[::-1, :]
    return [(t + r + hf + vf) / 4, (t + r - hf - vf) / 4, (t - r + hf - vf) / 4, (t - r - hf + vf) / 4]


def descriptor(sig: Signature) -> np.ndarray:
    """Unit float32 (DESCRIPTOR_DIM,) that the 8 symmetries of the square grid leave unchanged (cosine neighbours).

    Invariant to transposes too, so a near-square part turned by 90° keeps its descriptor."""
    t = cv2.resize(sig.band.astype(np.float32), (_THUMB, _THUMB), interpolation=cv2.INTER_AREA)
    # each projection only changes sign under a flip or a half turn, and one quadrant holds all of it
    q = [np.abs(c[: _THUMB // 2, : _THUMB // 2]) for c in _components(t)]
    # a transpose maps the first two projections to their transposes and swaps the last two
    parts = [(q[0] + q[0].T) / 2, (q[1] + q[1].T) / 2, (q[2] + q[3].T) / 2]
    feat = np.concatenate([p.ravel() for p in parts])
    feat -= feat.mean()
    return (feat / (np.linalg.norm(feat) + 1e-9)).astype(np.float32)


def _poses(band: np.ndarray, turns: bool) -> list[np.ndarray]:
    """The 4 symmetries of a rectangle; with `turns`, the 8 of a square (90° turns: transposes)."""
    poses = [band, band[::-1, ::-1], band[:, ::-1], band[::-1, :]]
    if turns:
        poses += [p.T for p in poses]
    return [np.ascontiguousarray(p) for p in poses]


def _aligned_ncc(fa: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Best NCC of `a` with `b` over shifts up to _MAX_SHIFT (found by phase correlation); `fa` = rfft2(a)."""
    h, w = a.shape
    cross = fa * np.conj(np.fft.rfft2(b))
    peak = np.fft.irfft2(cross / (np.abs(cross) + 1e-6), s=(h, w))
    my, mx = max(1, int(h * _MAX_SHIFT)), max(1, int(w * _MAX_SHIFT))
    window = np.roll(np.roll(peak, my, 0), mx, 1)[: 2 * my + 1, : 2 * mx + 1]  # shifts -m..m
    iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
    sy, sx = iy - my, ix - mx  # a(y, x) ~ b(y - sy, x - sx)
    ya, yb = max(0, sy), max(0, -sy)
    xa, xb = max(0, sx), max(0, -sx)
    oa = a[ya : h - yb, xa : w - xb]
    ob = b[yb : h - ya, xb : w - xa]
    oa = oa - oa.mean()
    ob = ob - ob.mean()
    return float((oa * ob).sum() / (np.sqrt((oa * oa).sum() * (ob * ob).sum()) + 1e-9))


def similarities(a: Signature, others: list[Signature]) -> np.ndarray:
    """Best aligned correlation of `a` with each of `others` over the part's symmetries: (M,) float32.

    Crops whose aspect ratios differ by more than _ASPECT_TOL score 0."""
    out = np.zeros(len(others), np.float32)
    band = a.band.astype(np.float32)
    fa = np.fft.rfft2(band)
    for k, b in enumerate(others):
        if abs(np.log(a.aspect / b.aspect)) > _ASPECT_TOL:
            continue
        turns = a.squarish or b.squarish  # which side is "long" is not repeatable then
        out[k] = max(_aligned_ncc(fa, band, p) for p in _poses(b.band.astype(np.float32), turns))
    return out


def similarity(a: Signature, b: Signature) -> float:
    return float(similarities(a, [b])[0])
