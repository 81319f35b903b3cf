"""Built-in demo castings: grey top-view photos of cast impellers, ok or carrying casting defects.

This is the embedded default data set: the demo and the tests use it when no real photos are given. The look
follows the real line photos (300x300 grey, light textured table, a turned flange with a rim, a dark vane
cavity, a bright hub ring and a bore, a drop shadow, uneven lighting, random rotation and position).
Defective parts carry one or more of: blowholes/pinholes, burr/flash on the rim, cracks, shrinkage cavities
and chipped edges, from obvious to subtle. `render_part` also returns the defect mask so that heatmaps can be
checked against where the defect really is.

Everything is drawn from the `numpy.random.Generator` passed in, so a seed gives the same images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

DEFECT_KINDS = ("blowhole", "burr_flash", "crack", "shrinkage", "chipped_edge")

# folder names of the real data set, so that synthetic and real data ingest with the same label mapping
DEFECT_FOLDER = "def_front"
OK_FOLDER = "ok_front"


@dataclass(frozen=True)
class _Geometry:
    cx: float
    cy: float
    radius: float  # outer radius of the flange, pixels
    spin: float  # rotation of the part, radians


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled smoothly (cheap stand-in for Perlin noise)."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) * amplitude


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    # The real photos lie on a light grey table with a faint wavy pattern and a lighting gradient.
    level = rng.uniform(165, 215)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * rng.uniform(10, 35)
    waves = _smooth_noise(rng, size, 12, 1.0)
    pattern = np.abs(np.sin(waves * rng.uniform(2.0, 4.0))) * rng.uniform(3, 8)
    return level + gradient + pattern + _smooth_noise(rng, size, 5, 4.0)


def _radial_profile(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """Per-radius brightness jitter: the concentric marks of a turned surface."""
    fine = rng.standard_normal(n).astype(np.float32)
    fine = np.convolve(fine, np.ones(2, np.float32) / 2, mode="same")
    return fine * amplitude


def _draw_part(rng: np.random.Generator, size: int, geo: _Geometry) -> np.ndarray:
    """The ok part on its background, float32 grey (H, W) in roughly [0, 255]."""
    img = _background(rng, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - geo.cx, yy - geo.cy
    r = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx) - geo.spin
    rn = r / geo.radius  # normalised radius: 1.0 is the outer edge of the flange

    # drop shadow, offset away from the light, under the disc
    light = rng.uniform(0, 2 * np.pi)
    sx, sy = np.cos(light + np.pi) * geo.radius * 0.05, np.sin(light + np.pi) * geo.radius * 0.05
    rs = np.sqrt((xx - geo.cx - sx) ** 2 + (yy - geo.cy - sy) ** 2) / geo.radius
    shadow = np.clip((1.08 - rs) / 0.1, 0, 1) * rng.uniform(60, 110)
    img = img - shadow

    # flange: turned metal, lit unevenly (a broad lobe plus a narrower specular sector)
    phi = np.arctan2(dy, dx)
    base = rng.uniform(150, 195)
    lobe = rng.uniform(15, 40) * np.cos(phi - light)
    spec = rng.uniform(10, 45) * np.maximum(0, np.cos(phi - light - rng.uniform(-1, 1))) ** rng.uniform(6, 20)
    prof = _radial_profile(rng, size * 2, rng.uniform(3, 8))
    turned = prof[np.clip((r * 2).astype(np.int32), 0, size * 2 - 1)]
    shading = -18 * np.clip(rn - 0.85, 0, None) / 0.15  # the flange curves down towards its edge
    # the part's own surface: cast/turned roughness at several scales; it turns with the part, so rotated
    # photos of one part stay recognisable (ingest's near-duplicate grouping relies on such marks)
    rough = _smooth_noise(rng, size, 9, 6.0) + _smooth_noise(rng, size, 30, 7.0) + _smooth_noise(rng, size, 60, 4.0)
    flange = base + lobe + spec + turned + shading + rough

    # cavity with curved vanes (the impeller blades seen through the ring), dark
    n_vanes = int(rng.integers(6, 10))
    curl = rng.uniform(1.5, 2.6)
    vane_phase = (theta * n_vanes / (2 * np.pi) + curl * np.log(np.maximum(rn, 1e-3)) * n_vanes / (2 * np.pi)) % 1.0
    vane = np.exp(-(((vane_phase - 0.5) / 0.08) ** 2)) * rng.uniform(18, 35)
    cavity = rng.uniform(22, 38) + vane + 8 * np.cos(phi - light) + _smooth_noise(rng, size, 16, 5.0)

    inner_ring = rng.uniform(190, 225) + 15 * np.cos(phi - light) + turned * 0.5
    hub = rng.uniform(175, 215) + 20 * np.cos(phi - light + np.pi / 3) + turned * 0.5
    bore = rng.uniform(100, 150) - 40 * np.cos(phi - light) * (rn / 0.2)  # shadowed inner wall

    # radii of the features, normalised to the flange radius, slightly different from part to part
    r_ring_out = rng.uniform(0.6, 0.64)
    r_ring_in = r_ring_out - rng.uniform(0.04, 0.06)
    r_hub_out = rng.uniform(0.29, 0.33)
    r_bore = r_hub_out - rng.uniform(0.07, 0.1)

    out = img
    out = np.where(rn < 1.0, flange, out)
    out = _cosmetic_marks(rng, out, geo)
    out = np.where(np.abs(rn - 1.0) < 0.012, out * 0.55, out)  # dark bevel at the outer edge
    out = np.where((rn < r_ring_out + 0.02) & (rn >= r_ring_out), 45.0, out)  # groove around the ring
    out = np.where((rn < r_ring_out) & (rn >= r_ring_in), inner_ring, out)
    out = np.where((rn < r_ring_in) & (rn >= r_hub_out), cavity, out)
    out = np.where((rn < r_hub_out) & (rn >= r_bore), hub, out)
    out = np.where(rn < r_bore, bore, out)
    return out.astype(np.float32)


def _cosmetic_marks(rng: np.random.Generator, img: np.ndarray, geo: _Geometry) -> np.ndarray:
    """Faint handling scratches and stains every real part has; not defects (no mask)."""
    img = np.ascontiguousarray(img)
    for _ in range(int(rng.integers(3, 9))):
        x, y = _on_flange(rng, geo, 0.66, 0.97)
        a = rng.uniform(0, np.pi)
        length = rng.uniform(5, 25)
        p1 = (int(x), int(y))
        p2 = (int(x + length * np.cos(a)), int(y + length * np.sin(a)))
        cv2.line(img, p1, p2, float(img[p1[1], p1[0]] + rng.choice([-1, 1]) * rng.uniform(6, 14)), 1, cv2.LINE_AA)
    return img


def _on_flange(rng: np.random.Generator, geo: _Geometry, lo: float = 0.68, hi: float = 0.93) -> tuple[float, float]:
    a = rng.uniform(0, 2 * np.pi)
    rr = rng.uniform(lo, hi) * geo.radius
    return geo.cx + rr * np.cos(a), geo.cy + rr * np.sin(a)


def _blowhole(rng, img, mask, geo, severity):
    # round dark pits, one big or a few small (pinholes); the rim of a pit catches a little light
    count = 1 if rng.random() < 0.5 else int(rng.integers(2, 6))
    for _ in range(count):
        x, y = _on_flange(rng, geo)
        rad = max(1.0, severity * rng.uniform(2.0, 7.0) / (1 + 0.5 * (count > 1)))
        axes = (max(1, int(round(rad))), max(1, int(round(rad * rng.uniform(0.7, 1.0)))))
        ang = float(rng.uniform(0, 180))
        depth = 60 + 80 * severity
        cv2.ellipse(img, (int(x + 1), int(y + 1)), axes, ang, 0, 360, float(img[int(y), int(x)] + 25), -1)
        cv2.ellipse(img, (int(x), int(y)), axes, ang, 0, 360, max(10.0, float(img[int(y), int(x)] - depth)), -1)
        cv2.ellipse(mask, (int(x), int(y)), (axes[0] + 1, axes[1] + 1), ang, 0, 360, 1, -1)


def _burr_flash(rng, img, mask, geo, severity):
    # thin fins of metal squeezed out at the parting line: ragged protrusions beyond the rim
    a0 = rng.uniform(0, 2 * np.pi)
    span = rng.uniform(0.15, 0.6) * (0.5 + severity)
    n = 24
    angles = np.linspace(a0, a0 + span, n)
    height = (2 + 10 * severity) * np.abs(rng.standard_normal(n)) * np.sin(np.linspace(0, np.pi, n)) + 1
    outer = np.stack(
        [geo.cx + (geo.radius + height) * np.cos(angles), geo.cy + (geo.radius + height) * np.sin(angles)], 1
    )
    inner = np.stack(
        [geo.cx + (geo.radius - 2) * np.cos(angles[::-1]), geo.cy + (geo.radius - 2) * np.sin(angles[::-1])], 1
    )
    poly = np.concatenate([outer, inner]).astype(np.int32)
    cv2.fillPoly(img, [poly], float(rng.uniform(70, 150)))
    cv2.polylines(img, [outer.astype(np.int32)], False, float(rng.uniform(30, 60)), 1)
    cv2.fillPoly(mask, [poly], 1)
    cv2.polylines(mask, [outer.astype(np.int32)], False, 1, 2)


def _crack(rng, img, mask, geo, severity):
    # a thin jagged dark line, usually starting at an edge where the stress concentrates
    a = rng.uniform(0, 2 * np.pi)
    start_r = geo.radius * (0.99 if rng.random() < 0.6 else rng.uniform(0.66, 0.7))
    length = geo.radius * (0.08 + 0.25 * severity)
    direction = a + np.pi + rng.uniform(-0.6, 0.6) if start_r > geo.radius * 0.9 else a + rng.uniform(-0.6, 0.6)
    pts = [(geo.cx + start_r * np.cos(a), geo.cy + start_r * np.sin(a))]
    steps = 10
    for _ in range(steps):
        direction += rng.uniform(-0.5, 0.5)
        x, y = pts[-1]
        pts.append((x + length / steps * np.cos(direction), y + length / steps * np.sin(direction)))
    poly = np.array(pts, np.int32)
    width = 1 if severity < 0.5 else 2
    cv2.polylines(img, [poly], False, float(rng.uniform(15, 60)), width, lineType=cv2.LINE_AA)
    cv2.polylines(mask, [poly], False, 1, width + 2)


def _shrinkage(rng, img, mask, geo, severity):
    # a rough cluster of small interconnected voids
    x0, y0 = _on_flange(rng, geo)
    spread = 3 + 10 * severity
    for _ in range(int(rng.integers(5, 14))):
        x = x0 + rng.normal(0, spread / 2)
        y = y0 + rng.normal(0, spread / 2)
        axes = (int(rng.integers(1, 2 + int(3 * severity))), int(rng.integers(1, 2 + int(2 * severity))))
        ang = float(rng.uniform(0, 180))
        cv2.ellipse(img, (int(x), int(y)), axes, ang, 0, 360, float(rng.uniform(20, 90)), -1)
        cv2.ellipse(mask, (int(x), int(y)), (axes[0] + 1, axes[1] + 1), ang, 0, 360, 1, -1)


def _chipped_edge(rng, img, mask, geo, severity, background):
    # a piece broken off the rim: the background shows through a notch
    a = rng.uniform(0, 2 * np.pi)
    depth = geo.radius * (0.02 + 0.1 * severity)
    half = rng.uniform(0.03, 0.08) * (0.5 + severity)
    pts = [
        (geo.cx + (geo.radius + 3) * np.cos(a - half), geo.cy + (geo.radius + 3) * np.sin(a - half)),
        (
            geo.cx + (geo.radius - depth) * np.cos(a + rng.uniform(-0.3, 0.3) * half),
            geo.cy + (geo.radius - depth) * np.sin(a + rng.uniform(-0.3, 0.3) * half),
        ),
        (geo.cx + (geo.radius + 3) * np.cos(a + half), geo.cy + (geo.radius + 3) * np.sin(a + half)),
    ]
    poly = np.array(pts, np.int32)
    notch = np.zeros(img.shape, np.uint8)
    cv2.fillPoly(notch, [poly], 1)
    img[notch > 0] = background[notch > 0] * 0.7  # in the shadow of the part
    cv2.polylines(img, [poly[:2], poly[1:]], False, float(rng.uniform(40, 80)), 1)
    mask[notch > 0] = 1


def render_part(rng: np.random.Generator, defect: bool, size: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """One part: (uint8 (size, size, 3) grey RGB image, bool (size, size) defect mask, all False when ok)."""
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels to draw a part, got {size}")
    geo = _Geometry(
        cx=size / 2 + rng.uniform(-0.05, 0.05) * size,
        cy=size / 2 + rng.uniform(-0.05, 0.05) * size,
        radius=size * rng.uniform(0.36, 0.45),
        spin=rng.uniform(0, 2 * np.pi),
    )
    img = _draw_part(rng, size, geo)
    mask = np.zeros((size, size), np.uint8)
    if defect:
        background = _background(rng, size)
        n_defects = 1 if rng.random() < 0.7 else 2
        for kind in rng.choice(DEFECT_KINDS, size=n_defects, replace=False):
            severity = float(rng.uniform(0.15, 1.0))  # 0.15 is subtle, 1.0 obvious
            if kind == "chipped_edge":
                _chipped_edge(rng, img, mask, geo, severity, background)
            else:
                {"blowhole": _blowhole, "burr_flash": _burr_flash, "crack": _crack, "shrinkage": _shrinkage}[kind](
                    rng, img, mask, geo, severity
                )
    img = cv2.GaussianBlur(img, (3, 3), 0.7)  # camera optics
    img += rng.normal(0, rng.uniform(1.5, 4.0), img.shape).astype(np.float32)  # sensor noise
    grey = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), mask.astype(bool)


def prepare_dataset_folders(out: Path, n: int, defect_fraction: float) -> tuple[Path, int]:
    """Check a render request and create out/def_front and out/ok_front; returns (out, number of defective parts)."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    if not 0.0 <= defect_fraction <= 1.0:
        raise ValueError(f"defect_fraction must be in [0, 1], got {defect_fraction}")
    out = Path(out)
    (out / DEFECT_FOLDER).mkdir(parents=True, exist_ok=True)
    (out / OK_FOLDER).mkdir(parents=True, exist_ok=True)
    return out, int(round(n * defect_fraction))


def render_dataset(out: Path, n: int, seed: int, defect_fraction: float = 0.5, size: int = 300) -> dict[str, int]:
    """Write `n` parts as PNG into `out/def_front` and `out/ok_front`; returns {"defect": k, "ok": n - k}.

    Deterministic for a seed: image i is drawn from its own generator seeded by (seed, i), so adding images
    never changes the earlier ones.
    """
    out, n_defect = prepare_dataset_folders(out, n, defect_fraction)
    counts = {"defect": 0, "ok": 0}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        defect = i < n_defect
        img, _ = render_part(rng, defect, size)
        folder, prefix = (DEFECT_FOLDER, "cast_def") if defect else (OK_FOLDER, "cast_ok")
        cv2.imwrite(str(out / folder / f"{prefix}_{seed}_{i:05d}.png"), img[:, :, 0])
        counts["defect" if defect else "ok"] += 1
    logger.info("rendered %d defect + %d ok parts (seed %d) into %s", counts["defect"], counts["ok"], seed, out)
    return counts
