"""Built-in demo tiles: flat, textured ferrite-like tiles photographed at varied, non-square sizes.

The second built-in part (`inspection synth --part tile`, `inspection demo --part tile`). It is what the
castings are not: no round cavity to centre on, frames about 120 to 630 px wide and never square, defects a few
pixels to a few tens of pixels on a textured surface. The look follows photos of sintered ferrite tiles: a grey,
granular surface with grinding streaks and mottling, a dark fixture around it, lighting that changes between
shots. Defective tiles carry one or more of: blowholes (pits), cracks, chips broken off an edge or corner, frayed
edges and uneven patches; `render_tile` returns the defect mask, like `inspection.synth.render_part`.

A tile is made once (`make_tile`: its surface, defects and mask at native resolution) and photographed several
times (`photograph`): turned by a multiple of 90 degrees, mirrored or not, tilted by a degree or two, shifted and
zoomed a little, re-lit and re-exposed. So several photos show one physical tile, as in real data sets, and a
split that ignored that would put a tile on both sides (ingest's near-duplicate groups keep it on one).

Everything is drawn from the `numpy.random.Generator` passed in, so a seed gives the same images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inspection.synth import DEFECT_FOLDER, OK_FOLDER, prepare_dataset_folders

logger = logging.getLogger(__name__)

TILE_DEFECT_KINDS = ("blowhole", "crack", "chip", "fray", "uneven")
MIN_WIDTH, MAX_WIDTH = 120, 630  # photo width of a tile in its native pose
MIN_SIDE = 80  # the short side never goes below this (ingest refuses < 32 px; defects need room)
SHOTS = 3  # photos per tile by default


@dataclass(frozen=True)
class Tile:
    """One physical tile on its fixture: grey surface float32 (H, W), defect mask uint8 (H, W), and its box."""

    surface: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]  # (top, left, bottom, right) of the tile in `surface`; outside is the fixture
    defect: bool
    kinds: tuple[str, ...]


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float, amplitude: float) -> np.ndarray:
    """Smooth noise with features about `cell` pixels wide: a coarse random grid upsampled (cheap Perlin)."""
    h, w = shape
    coarse = rng.standard_normal((max(2, round(h / cell) + 1), max(2, round(w / cell) + 1))).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC) * amplitude


def _streaks(rng: np.random.Generator, shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """Grinding marks: fine noise smeared along one direction (the grinding wheel's travel)."""
    h, w = shape
    fine = rng.standard_normal((h, w)).astype(np.float32)
    length = int(rng.integers(15, 45)) | 1
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0 / length
    angle = float(rng.choice([0.0, 90.0]) + rng.uniform(-12, 12))  # along an axis of the tile, roughly
    rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (length, length))
    kernel /= kernel.sum() + 1e-9
    streaks = cv2.filter2D(fine, -1, kernel, borderType=cv2.BORDER_REFLECT)
    return streaks / (streaks.std() + 1e-6) * amplitude


def _tile_size(rng: np.random.Generator) -> tuple[int, int]:
    """(H, W) of the photo frame in the tile's native pose: W in 120..630, never square."""
    width = int(rng.integers(MIN_WIDTH, MAX_WIDTH + 1))
    for _ in range(20):
        aspect = float(np.exp(rng.uniform(np.log(0.3), np.log(2.2))))
        height = int(round(width * aspect))
        if MIN_SIDE <= height <= MAX_WIDTH and not 0.87 < aspect < 1.15:  # turned by 90°: still <= 630 wide
            return height, width
    return max(MIN_SIDE, int(round(width * 0.6))), width


def _draw_surface(
    rng: np.random.Generator, shape: tuple[int, int], box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(the tile on its fixture, the bare fixture) float32 grey (H, W)."""
    top, left, bottom, right = box
    fixture = rng.uniform(18, 40) + _noise(rng, shape, 40, 3.0)
    base = rng.uniform(95, 145)
    grain = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), 0.8) * rng.uniform(10, 16)
    mottle = _noise(rng, shape, rng.uniform(6, 12), rng.uniform(4, 7)) + _noise(rng, shape, 30, rng.uniform(3, 6))
    surface = base + grain + mottle + _streaks(rng, shape, rng.uniform(3, 6)) + _noise(rng, shape, 150, 6.0)
    surface = _cosmetic_marks(rng, surface, box)
    inside = np.zeros(shape, np.uint8)
    radius = int(rng.integers(2, 7))  # pressed tiles have slightly rounded corners
    cv2.rectangle(inside, (left + radius, top), (right - 1 - radius, bottom - 1), 1, -1)
    cv2.rectangle(inside, (left, top + radius), (right - 1, bottom - 1 - radius), 1, -1)
    for cy, cx in ((top + radius, left + radius), (top + radius, right - 1 - radius)):
        cv2.circle(inside, (cx, cy), radius, 1, -1)
    for cy, cx in ((bottom - 1 - radius, left + radius), (bottom - 1 - radius, right - 1 - radius)):
        cv2.circle(inside, (cx, cy), radius, 1, -1)
    edge = cv2.morphologyEx(inside, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    out = np.where(inside > 0, surface, fixture).astype(np.float32)
    out[edge & (inside > 0)] += rng.uniform(15, 30)  # the ground edge (chamfer) catches the light
    return out, fixture.astype(np.float32)


def _cosmetic_marks(rng: np.random.Generator, img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Faint handling marks and specks every tile has; not defects (no mask)."""
    img = np.ascontiguousarray(img)
    top, left, bottom, right = box
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(left + 4, right - 4), rng.uniform(top + 4, bottom - 4)
        a, length = rng.uniform(0, np.pi), rng.uniform(8, 40)
        p1, p2 = (int(x), int(y)), (int(x + length * np.cos(a)), int(y + length * np.sin(a)))
        cv2.line(img, p1, p2, float(img[p1[1], p1[0]] + rng.choice([-1, 1]) * rng.uniform(4, 9)), 1, cv2.LINE_AA)
    for _ in range(int(rng.integers(3, 12))):
        x, y = int(rng.uniform(left + 2, right - 2)), int(rng.uniform(top + 2, bottom - 2))
        cv2.circle(img, (x, y), 1, float(img[y, x] + rng.uniform(8, 18)), -1)  # bright specks: harmless
    return img


# ------------------------------------------------------------------------------------------------------ defects
def _point_on(rng: np.random.Generator, box: tuple[int, int, int, int], inset: float) -> tuple[float, float]:
    top, left, bottom, right = box
    dx, dy = inset * (right - left), inset * (bottom - top)
    return rng.uniform(left + dx, right - dx), rng.uniform(top + dy, bottom - dy)


def _blowhole(rng, img, mask, box, severity):
    # round pits from gas trapped in the pressing: one or a few, a bright lip on the side facing the light
    for _ in range(1 if rng.random() < 0.5 else int(rng.integers(2, 5))):
        x, y = _point_on(rng, box, 0.08)
        rad = 1.5 + severity * rng.uniform(1.5, 6.0)
        axes = (max(1, round(rad)), max(1, round(rad * rng.uniform(0.7, 1.0))))
        ang = float(rng.uniform(0, 180))
        level = float(img[int(y), int(x)])
        cv2.ellipse(img, (int(x) + 1, int(y) + 1), axes, ang, 0, 360, level + 20, -1)
        cv2.ellipse(img, (int(x), int(y)), axes, ang, 0, 360, max(8.0, level - 45 - 45 * severity), -1)
        cv2.ellipse(mask, (int(x), int(y)), (axes[0] + 1, axes[1] + 1), ang, 0, 360, 1, -1)


def _crack(rng, img, mask, box, severity):
    # a thin jagged dark line, often from an edge inwards, sometimes with a branch
    top, left, bottom, right = box
    if rng.random() < 0.6:
        side = int(rng.integers(4))
        x, y = _point_on(rng, box, 0.1)
        x, y, direction = [(x, top + 1, np.pi / 2), (x, bottom - 2, -np.pi / 2), (left + 1, y, 0.0)][side % 3]
        if side == 3:
            x, direction = right - 2, np.pi
    else:
        (x, y), direction = _point_on(rng, box, 0.15), rng.uniform(0, 2 * np.pi)
    length = 20 + severity * rng.uniform(30, 90)
    steps = 10
    pts = [(x, y)]
    for _ in range(steps):
        direction += rng.uniform(-0.45, 0.45)
        px, py = pts[-1]
        pts.append((px + length / steps * np.cos(direction), py + length / steps * np.sin(direction)))
    width = 1 if severity < 0.4 else 2 if severity < 0.85 else 3
    lines = [np.array(pts, np.int32)]
    if rng.random() < 0.3:
        k = int(rng.integers(3, steps - 2))
        a = direction + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
        bx, by = pts[k]
        lines.append(np.array([(bx, by), (bx + length * 0.3 * np.cos(a), by + length * 0.3 * np.sin(a))], np.int32))
    # drawn as a darkening layer kept inside the tile: a crack running off the edge does not mark the fixture
    layer = np.zeros(img.shape, np.uint8)
    cv2.polylines(layer, lines, False, 255, width, lineType=cv2.LINE_AA)
    tile = np.zeros(img.shape, np.float32)
    tile[top:bottom, left:right] = 1.0
    img -= layer.astype(np.float32) / 255.0 * tile * (40 + 40 * severity)
    wide = np.zeros(img.shape, np.uint8)
    cv2.polylines(wide, lines, False, 1, width + 2)
    mask[(wide > 0) & (tile > 0)] = 1


def _chip(rng, img, mask, box, severity, fixture):
    # a piece broken off an edge or a corner: the fixture shows through the notch, its broken rim is bright
    top, left, bottom, right = box
    depth = 6 + severity * rng.uniform(6, 30)
    half = depth * rng.uniform(0.8, 1.8)
    if rng.random() < 0.4:  # a corner
        cy, cx = (top, bottom)[int(rng.integers(2))], (left, right)[int(rng.integers(2))]
        sy, sx = (1 if cy == top else -1), (1 if cx == left else -1)
        pts = [(cx - 2 * sx, cy - 2 * sy), (cx + sx * half * 1.5, cy - 2 * sy)]
        pts += [(cx + sx * depth * 0.6, cy + sy * depth * 0.7), (cx - 2 * sx, cy + sy * half * 1.5)]
    else:
        side = int(rng.integers(4))
        x, y = _point_on(rng, box, 0.12)
        if side < 2:
            ey, sy = (top, 1) if side == 0 else (bottom - 1, -1)
            tip = (x + rng.uniform(-0.3, 0.3) * half, ey + sy * depth)
            pts = [(x - half, ey - 2 * sy), tip, (x + half, ey - 2 * sy)]
        else:
            ex, sx = (left, 1) if side == 2 else (right - 1, -1)
            tip = (ex + sx * depth, y + rng.uniform(-0.3, 0.3) * half)
            pts = [(ex - 2 * sx, y - half), tip, (ex - 2 * sx, y + half)]
    # a broken edge is ragged: jitter the break line between its end points
    pts = [pts[0], *[(x + rng.normal(0, depth / 8), y + rng.normal(0, depth / 8)) for x, y in pts[1:-1]], pts[-1]]
    poly = np.array(pts, np.int32)
    tile = np.zeros(img.shape, np.uint8)
    tile[top:bottom, left:right] = 1
    notch = np.zeros(img.shape, np.uint8)
    cv2.fillPoly(notch, [poly], 1)
    notch &= tile
    img[notch > 0] = fixture[notch > 0]
    rim = (cv2.dilate(notch, np.ones((3, 3), np.uint8)) > 0) & (notch == 0) & (tile > 0)
    img[rim] += rng.uniform(10, 25)  # the fresh fracture catches the light
    mask[(notch > 0) | rim] = 1


def _fray(rng, img, mask, box, severity, fixture):
    # a frayed edge: a run of small irregular bites along one side
    top, left, bottom, right = box
    side = int(rng.integers(4))
    along = (right - left) if side < 2 else (bottom - top)
    length = min(along * 0.8, 15 + severity * rng.uniform(20, 80))
    start = rng.uniform(0.05 * along, along - length - 0.05 * along) if along - length > 0.1 * along else 0.0
    band = np.zeros(img.shape, np.uint8)
    t = start
    while t < start + length:
        size = rng.uniform(2.0, 4.0 + 5.0 * severity)  # how deep the bite goes into the tile
        width = rng.uniform(1.5, 4.0)
        if side < 2:
            y = top if side == 0 else bottom - 1
            cv2.ellipse(band, (int(left + t), int(y)), (int(width), int(size)), 0, 0, 360, 1, -1)
        else:
            x = left if side == 2 else right - 1
            cv2.ellipse(band, (int(x), int(top + t)), (int(size), int(width)), 0, 0, 360, 1, -1)
        t += width * rng.uniform(1.2, 2.5)
    tile = np.zeros(img.shape, np.uint8)
    tile[top:bottom, left:right] = 1
    band &= tile
    img[band > 0] = fixture[band > 0] * 0.9 + img[band > 0] * 0.1
    rim = (cv2.dilate(band, np.ones((3, 3), np.uint8)) > 0) & (band == 0) & (tile > 0)
    img[rim] += rng.uniform(8, 20)  # torn grains catch the light along the frayed edge
    mask[(band > 0) | rim] = 1


def _uneven(rng, img, mask, box, severity):
    # a patch of different density: a soft, blotchy area lighter or darker than the rest
    x, y = _point_on(rng, box, 0.15)
    size = 14 + severity * rng.uniform(15, 45)
    blob = np.zeros(img.shape, np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = x + rng.normal(0, size / 3), y + rng.normal(0, size / 3)
        axes = (max(2, int(size * rng.uniform(0.3, 0.6))), max(2, int(size * rng.uniform(0.2, 0.5))))
        cv2.ellipse(blob, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    blob = cv2.GaussianBlur(blob, (0, 0), max(1.0, size / 6))
    blob = np.clip(blob / (blob.max() + 1e-6), 0, 1)
    top, left, bottom, right = box
    inside = np.zeros(img.shape, np.float32)
    inside[top:bottom, left:right] = 1.0
    blob *= inside
    img += blob * float(rng.choice([-1, 1])) * (22 + 22 * severity)
    mask[blob > 0.4] = 1


def make_tile(rng: np.random.Generator, defect: bool) -> Tile:
    """One physical tile: its surface on the fixture, with defects (and their mask) when `defect`."""
    shape = _tile_size(rng)
    h, w = shape
    my, mx = (max(3, int(round(s * rng.uniform(0.03, 0.07)))) for s in shape)  # fixture visible around it
    box = (my, mx, h - my, w - mx)
    surface, fixture = _draw_surface(rng, shape, box)
    mask = np.zeros(shape, np.uint8)
    kinds: tuple[str, ...] = ()
    if defect:
        kinds = tuple(str(k) for k in rng.choice(TILE_DEFECT_KINDS, size=1 if rng.random() < 0.7 else 2, replace=False))
        for kind in kinds:
            severity = float(rng.uniform(0.25, 1.0))  # 0.25: a few pixels; 1.0: tens of pixels
            if kind in ("chip", "fray"):
                {"chip": _chip, "fray": _fray}[kind](rng, surface, mask, box, severity, fixture)
            else:
                {"blowhole": _blowhole, "crack": _crack, "uneven": _uneven}[kind](rng, surface, mask, box, severity)
    return Tile(surface=surface, mask=mask, box=box, defect=defect, kinds=kinds)


# ------------------------------------------------------------------------------------------------------ photos
def photograph(rng: np.random.Generator, tile: Tile, pose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One photo of `tile`: (uint8 (h, w, 3) grey RGB, bool (h, w) defect mask).

    `pose`: turn it by a random multiple of 90 degrees and mirror it half of the time (the tile lies either way
    up on the fixture); a degree or two of tilt, a small shift and zoom, new light and exposure always."""
    img, mask = tile.surface, tile.mask
    h, w = img.shape
    # tilt, shift and zoom about the centre, same frame size: the camera's ROI finds the tile a bit differently
    angle = rng.uniform(-2.0, 2.0)
    zoom = rng.uniform(0.96, 1.04)
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
    m[:, 2] += rng.uniform(-0.02, 0.02, 2) * (w, h)
    fixture = float(np.median(img[: max(2, tile.box[0] // 2)]))
    img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fixture)
    mask = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if pose:
        k = int(rng.integers(4))
        img, mask = np.rot90(img, k), np.rot90(mask, k)
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
    img = np.ascontiguousarray(img, np.float32)
    h, w = img.shape
    # new light: exposure, a gradient across the frame and a gamma of the camera
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(a) * (xx / w - 0.5) + np.sin(a) * (yy / h - 0.5)) * rng.uniform(0, 30)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-10, 10) + ramp
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.9, 1.1)
    img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 0.9))  # optics
    img += rng.normal(0, rng.uniform(1.5, 3.5), img.shape).astype(np.float32)  # sensor noise
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), mask.astype(bool)


def render_tile(rng: np.random.Generator, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """One tile, one photo: (uint8 (H, W, 3) grey RGB image, bool (H, W) defect mask, all False when ok)."""
    return photograph(rng, make_tile(rng, defect))


def render_tile_dataset(
    out: Path, n: int, seed: int, defect_fraction: float = 0.5, shots: int = SHOTS
) -> dict[str, int]:
    """Write `n` tiles, `shots` photos each, as PNG into `out/def_front` and `out/ok_front`.

    Returns photo counts {"defect": k, "ok": m}. Tile i is drawn from its own generator seeded by (seed, i) and
    its photo j from (seed, i, j), so adding tiles or photos never changes the earlier ones. File names say which
    tile a photo shows (`tile_def_<seed>_<tile>_<shot>.png`), for checking the grouping.
    """
    if shots < 1:
        raise ValueError(f"shots must be ≥ 1, got {shots}")
    out, n_defect = prepare_dataset_folders(out, n, defect_fraction)
    counts = {"defect": 0, "ok": 0}
    for i in range(n):
        defect = i < n_defect
        tile = make_tile(np.random.default_rng([seed, i]), defect)
        folder, prefix = (DEFECT_FOLDER, "tile_def") if defect else (OK_FOLDER, "tile_ok")
        for j in range(shots):
            img, mask = photograph(np.random.default_rng([seed, i, j]), tile)
            if defect and not mask.any():  # the tilt moved every defect pixel out of the frame: shoot again
                img, mask = photograph(np.random.default_rng([seed, i, j, 1]), tile, pose=True)
            cv2.imwrite(str(out / folder / f"{prefix}_{seed}_{i:05d}_{j}.png"), img[:, :, 0])
            counts["defect" if defect else "ok"] += 1
    logger.info(
        "rendered %d defect + %d ok tile photos (%d tiles, %d each, seed %d) into %s",
        counts["defect"],
        counts["ok"],
        n,
        shots,
        seed,
        out,
    )
    return counts
