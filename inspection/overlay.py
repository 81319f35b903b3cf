"""How a raw heatmap is drawn over the photo QA looks at (no torch): `inspection.decisions.heatmap_overlay`.

The model's map is coarse (7x7 today, 19x19 or finer from newer models) and covers the whole frame, background
included. So that it points at the defect rather than at a blocky corner of the table:
- it is upsampled smoothly to the photo (bicubic between cell centres, then a blur of a quarter cell);
- it is read inside the part only: the part's silhouette is found from the photo (`part_mask`), the background is
  faded and carries no colour;
- it is drawn in one hue whose opacity follows the value relative to the part's median (no rainbow: a colour
  scale has no natural order for a reader, opacity has), so a flat map stays faint;
- its peak inside the part is marked with a ring and four ticks that leave the spot itself visible.

`part_mask` is tuned for round cast parts on a plain table (the line's impellers): edges of the photo, the
part's centre from its strongest ring of edges, the outer rim as the largest radius around which edges cover a
fifth of the angles, then the disc of that radius joined with the convex hull of the edges inside it (chipped or
flashed rims stay inside). It takes ~2 ms at 300 px and returns None when it finds no such part; the overlay is
then drawn over the whole frame.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

logger = logging.getLogger(__name__)

HUE_RGB = (230, 30, 45)  # one strong red: reads on grey metal and on the dark viewer, unlike the greys it sits on
FADE_RGB = (15, 23, 42)  # the background is pulled towards the viewer's dark slate, so the part stands out
MAX_OPACITY = 0.75  # at the peak: the surface under the hottest spot stays visible through the colour
FADE = 0.6  # how far the background is pulled towards FADE_RGB
MIN_SPAN = 0.15  # a map whose values inside the part span less than this is drawn faint: it points nowhere
MIN_MARK_SPAN = 0.03  # below this span there is no peak worth a marker
OPACITY_GAMMA = 1.5  # > 1: the colour gathers on the peak instead of washing over the whole part

_WORK_SIDE = 160  # silhouette search runs on this many pixels per side: ~2 ms, and a 300 px rim keeps 2 px
_MIN_SIDE = 64  # smaller frames are thumbnails or test patterns: no silhouette search
_EDGE_FRACTION = 0.2  # edge pixels: gradient above this share of the 99th percentile (the rim is faint on dark sides)
_MIN_COMPONENT = 0.002  # edge fragments smaller than this share of the frame are texture, not outline
_RIM_COVERAGE = 0.2  # the rim: outermost radius at which edges cover at least this share of the angles
_ANGLE_BINS = 90


def upsample_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map in [0, 1] -> (H, W) float32 in [0, 1] for `size` = (H, W), smooth at any h x w.

    Cell centres keep their place (the model resizes the whole frame, no crop); bicubic interpolation plus a blur
    of a quarter cell removes the cell edges without moving the peak.
    """
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32))
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"heatmap must be a non-empty 2-D map, got shape {heat.shape}")
    height, width = size
    heat = np.clip(heat, 0.0, 1.0)
    if heat.shape == (1, 1):
        return np.full((height, width), float(heat[0, 0]), np.float32)
    up = cv2.resize(heat, (width, height), interpolation=cv2.INTER_CUBIC)  # (H, W)
    cell = max(height / heat.shape[0], width / heat.shape[1])
    sigma = 0.25 * cell
    if sigma >= 0.5:
        up = cv2.GaussianBlur(up, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    return np.clip(up, 0.0, 1.0)


def part_mask(image: np.ndarray) -> np.ndarray | None:
    """uint8 RGB or grey (H, W[, 3]) photo -> bool (H, W) silhouette of the part, or None when none is found."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else np.asarray(image)
    height, width = grey.shape
    if min(height, width) < _MIN_SIDE:
        return None
    scale = _WORK_SIDE / max(height, width)
    small = cv2.resize(
        grey, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
    )
    blur = cv2.GaussianBlur(small, (0, 0), 1.0)
    mag = cv2.magnitude(cv2.Sobel(blur, cv2.CV_32F, 1, 0), cv2.Sobel(blur, cv2.CV_32F, 0, 1))
    if float(mag.max()) <= 0.0:
        return None  # a flat frame: nothing to outline

    # centre: the biggest connected set of strong (Otsu) edges, i.e. the part's inner rings
    mag8 = np.clip(mag * (255.0 / float(mag.max())), 0, 255).astype(np.uint8)
    _, strong = cv2.threshold(mag8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(strong, connectivity=8)
    if n < 2:
        return None
    core = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    (cx, cy), _ = cv2.minEnclosingCircle(cv2.findNonZero((labels == core).astype(np.uint8)))

    # outline candidates: fainter edges, without the specks of table texture
    edges = (mag > _EDGE_FRACTION * np.percentile(mag, 99)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(edges, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= _MIN_COMPONENT * small.size
    ys, xs = np.nonzero(keep[labels])
    if len(xs) < 5:
        return None
    radius = np.hypot(xs - cx, ys - cy)
    angle = np.arctan2(ys - cy, xs - cx)
    r_bin = np.round(radius / 2).astype(int)  # 2 px rings
    a_bin = ((angle + np.pi) / (2 * np.pi) * _ANGLE_BINS).astype(int) % _ANGLE_BINS
    covered = np.zeros((int(r_bin.max()) + 2, _ANGLE_BINS), bool)
    covered[r_bin, a_bin] = True
    covered |= np.roll(covered, 1, axis=0)  # a rim that wanders by a ring (a slightly oval part) still counts
    rims = np.nonzero(covered.mean(axis=1) >= _RIM_COVERAGE)[0]

    mask = np.zeros(small.shape, np.uint8)
    if len(rims):
        rim = float(rims.max() * 2 + 2)
        inside = radius <= rim + 3
        points = np.stack([xs[inside], ys[inside]], axis=1).astype(np.int32)
        cv2.fillConvexPoly(mask, cv2.convexHull(points), 1)
        cv2.circle(mask, (round(cx), round(cy)), round(rim), 1, -1)
    else:  # no round rim: the hull of the outline is the best guess at the part
        cv2.fillConvexPoly(mask, cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32)), 1)
    share = float(mask.mean())
    if not 0.05 <= share <= 0.995:
        logger.debug(
            "part silhouette covers %.1f %% of the frame: not a part, drawing over the whole frame", 100 * share
        )
        return None
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)


def heatmap_peak(heat: np.ndarray, mask: np.ndarray | None = None) -> tuple[int, int]:
    """(x, y) pixel of the largest value of a full-size map, inside `mask` when one is given (and not empty)."""
    values = np.asarray(heat, dtype=np.float32)
    if mask is not None and mask.any():
        values = np.where(mask, values, -1.0)
    y, x = np.unravel_index(int(np.argmax(values)), values.shape)
    return int(x), int(y)


def _soft(mask: np.ndarray, size: int) -> np.ndarray:
    """bool mask -> float32 weight with a feathered edge a little outside the silhouette (generous, not clipped)."""
    grow = max(1, round(0.01 * size))
    weight = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    return cv2.GaussianBlur(weight.astype(np.float32), (0, 0), max(0.8, 0.01 * size))


def _draw_marker(canvas: np.ndarray, x: int, y: int) -> None:
    """A ring with four outward ticks around (x, y), white over a dark outline: visible on bright and dark metal."""
    size = min(canvas.shape[:2])
    radius = max(7, round(0.055 * size))
    tick = max(4, round(0.035 * size))
    width = max(1, round(size / 200))
    for colour, extra in (((15, 23, 42), 2), ((255, 255, 255), 0)):
        cv2.circle(canvas, (x, y), radius, colour, width + extra, cv2.LINE_AA)
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            start = (x + dx * (radius + 2), y + dy * (radius + 2))
            end = (x + dx * (radius + 2 + tick), y + dy * (radius + 2 + tick))
            cv2.line(canvas, start, end, colour, width + extra, cv2.LINE_AA)


def render_overlay(
    image: np.ndarray, heatmap: np.ndarray, max_opacity: float = MAX_OPACITY, find_part: bool = True
) -> tuple[np.ndarray, tuple[int, int] | None, np.ndarray | None]:
    """uint8 RGB (H, W, 3) + raw map (h, w) -> (overlay uint8 (H, W, 3), marked peak (x, y) or None, part mask).

    See the module docstring for what is drawn and why.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {image.shape}")
    height, width = image.shape[:2]
    heat = upsample_heatmap(heatmap, (height, width))  # (H, W)
    mask = part_mask(image) if find_part else None
    inside = heat[mask] if mask is not None else heat.ravel()
    low, high = float(np.median(inside)), float(inside.max())
    span = high - low
    relative = np.clip((heat - low) / max(span, MIN_SPAN), 0.0, 1.0) ** OPACITY_GAMMA
    weight = _soft(mask, min(height, width)) if mask is not None else np.ones((height, width), np.float32)

    base = image.astype(np.float32)
    fade = (FADE * (1.0 - weight))[..., None]  # (H, W, 1)
    base = base * (1.0 - fade) + np.asarray(FADE_RGB, np.float32) * fade
    opacity = (max_opacity * relative * weight)[..., None]
    out = base * (1.0 - opacity) + np.asarray(HUE_RGB, np.float32) * opacity
    canvas = np.ascontiguousarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    peak = None
    if span >= MIN_MARK_SPAN:
        peak = heatmap_peak(heat, mask)
        _draw_marker(canvas, *peak)
    return canvas, peak, mask
