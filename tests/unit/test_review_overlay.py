"""The heatmap overlay QA looks at: smooth at any map size, inside the part only, one hue, the peak ringed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspection.decisions import DecisionStore, heatmap_overlay
from inspection.images import decode_image, encode_png
from inspection.overlay import FADE_RGB, HUE_RGB, heatmap_peak, part_mask, render_overlay, upsample_heatmap
from inspection.schemas import InspectionResult, Thresholds, Verdict
from inspection.synth import render_part


def _part(seed: int, size: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic defective casting and its defect mask."""
    image, defect = render_part(np.random.default_rng(seed), True, size)
    assert defect.any()
    return image, defect


def _planted(defect: np.ndarray, cells: int, decoy: bool = True) -> tuple[np.ndarray, tuple[float, float]]:
    """A (cells, cells) map: low noise, one hot cell on the defect, and (decoy) a hotter cell in a background
    corner, as the old 7x7 maps had; returns the map and the hot cell's centre in photo pixels (x, y)."""
    h, w = defect.shape
    ys, xs = np.nonzero(defect)
    cx, cy = float(xs.mean()), float(ys.mean())
    i, j = min(cells - 1, int(cy / h * cells)), min(cells - 1, int(cx / w * cells))
    rng = np.random.default_rng(cells)
    heat = (0.05 + 0.03 * rng.random((cells, cells))).astype(np.float32)
    heat[i, j] = 0.9
    for di, dj in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        if 0 <= i + di < cells and 0 <= j + dj < cells:
            heat[i + di, j + dj] = 0.4
    if decoy:
        heat[0, 0] = 1.0
    return heat, ((j + 0.5) * w / cells, (i + 0.5) * h / cells)


def _redness(pixels: np.ndarray) -> np.ndarray:
    px = pixels.astype(np.int32)
    return px[..., 0] - (px[..., 1] + px[..., 2]) // 2


@pytest.mark.parametrize("cells", [7, 19, 38])
def test_peak_is_ringed_on_the_planted_spot_not_on_the_background_corner(cells: int) -> None:
    image, defect = _part(seed=11)
    heat, (px, py) = _planted(defect, cells)
    overlay, peak, mask = render_overlay(image, heat)
    assert mask is not None and not mask[2, 2]  # the corner is table, not part
    assert peak is not None
    cell = 300 / cells
    assert np.hypot(peak[0] - px, peak[1] - py) <= max(6.0, 0.5 * cell)  # on the planted cell, whatever its size
    # the marker is drawn: a white ring around the peak, the peak itself stays readable (not painted over)
    r = max(7, round(0.055 * 300))
    ring = [(round(peak[0] + r * np.cos(a)), round(peak[1] + r * np.sin(a))) for a in np.linspace(0, 6.2, 24)]
    inside = [(x, y) for x, y in ring if 0 <= x < 300 and 0 <= y < 300]
    assert np.mean([overlay[y, x].min() >= 200 for x, y in inside]) > 0.8
    # one hue: the hot spot is red, nothing is blue or green-tinted
    assert _redness(overlay[peak[1], peak[0]]) > 40
    assert (overlay[..., 2].astype(int) - overlay[..., 0] <= 40).all()


@pytest.mark.parametrize("cells", [7, 19])
def test_background_is_faded_and_carries_no_colour(cells: int) -> None:
    image, defect = _part(seed=5)
    heat, _ = _planted(defect, cells)  # the hottest cell of all sits on the background corner
    overlay, _, mask = render_overlay(image, heat)
    assert mask is not None
    corner = (slice(0, 12), slice(0, 12))
    assert not mask[corner].any()
    faded = image[corner].astype(float) * 0.4 + np.asarray(FADE_RGB, float) * 0.6
    assert np.abs(overlay[corner].astype(float) - faded).max() <= 3  # faded towards the dark, no red added
    assert np.abs(_redness(overlay[corner])).max() <= 12
    outside = ~mask
    assert overlay[outside].mean() < image[outside].mean() - 30  # the table is pulled down
    # inside, far from the hot spot, the photo is left as it was
    far = mask.copy()
    ys, xs = np.nonzero(defect)
    yy, xx = np.mgrid[0:300, 0:300]
    far &= np.hypot(xx - xs.mean(), yy - ys.mean()) > 120
    assert far.any()
    assert np.abs(overlay[far].astype(int) - image[far]).mean() < 6


def test_part_mask_finds_synthetic_parts_and_refuses_noise() -> None:
    for seed in range(6):
        image, defect = _part(seed)
        mask = part_mask(image)
        assert mask is not None, seed
        assert 0.25 < mask.mean() < 0.85, (seed, mask.mean())
        assert mask[defect].mean() > 0.9, seed  # defects on the flange and the rim are inside the silhouette
        for y, x in ((1, 1), (1, 298), (298, 1), (298, 298)):
            assert not mask[y, x], seed
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    assert part_mask(noise) is None  # too small to be a camera frame: drawn over the whole frame
    assert part_mask(np.full((300, 300, 3), 128, np.uint8)) is None  # a flat frame has no part


def test_upsample_is_smooth_keeps_peaks_and_handles_any_shape() -> None:
    heat = np.zeros((5, 9), np.float32)
    heat[2, 6] = 1.0
    up = upsample_heatmap(heat, (150, 270))
    assert up.shape == (150, 270) and up.dtype == np.float32
    assert up.min() >= 0.0 and up.max() <= 1.0
    x, y = heatmap_peak(up)
    assert abs(x - 6.5 * 30) <= 2 and abs(y - 2.5 * 30) <= 2
    assert np.abs(np.diff(up, axis=1)).max() < 0.1  # no cell edges: neighbouring pixels differ little
    assert upsample_heatmap(np.full((1, 1), 0.3), (4, 6)).tolist() == np.full((4, 6), 0.3, np.float32).tolist()
    with pytest.raises(ValueError, match="2-D"):
        upsample_heatmap(np.zeros((2, 2, 2)), (4, 4))


def test_flat_map_is_faint_and_unmarked() -> None:
    image, _ = _part(seed=3)
    overlay, peak, _ = render_overlay(image, np.full((19, 19), 0.6, np.float32))
    assert peak is None
    mask = cv2.erode(part_mask(image).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)  # off the fade
    assert np.abs(overlay[mask].astype(int) - image[mask]).max() <= 2  # nothing to point at: nothing drawn
    weak = 0.6 + 0.02 * np.random.default_rng(1).random((19, 19)).astype(np.float32)
    overlay, _, _ = render_overlay(image, weak)
    assert np.abs(overlay[mask].astype(int) - image[mask]).mean() < 3


def test_peak_without_a_silhouette_is_the_frames_maximum() -> None:
    frame = np.full((120, 160, 3), 90, np.uint8)  # no part in it: the map is drawn over the whole frame
    heat = np.zeros((7, 7), np.float32)
    heat[5, 1] = 1.0
    overlay, peak, mask = render_overlay(frame, heat)
    assert mask is None and peak is not None
    assert abs(peak[0] - 1.5 * 160 / 7) <= 3 and abs(peak[1] - 5.5 * 120 / 7) <= 3
    assert _redness(overlay[peak[1], peak[0]]) > 60
    assert tuple(HUE_RGB)[0] > 200


def test_overlay_png_from_the_store_marks_the_defect(tmp_path) -> None:
    image, defect = _part(seed=11)
    heat, (px, py) = _planted(defect, 19)
    store = DecisionStore(tmp_path)
    result = InspectionResult(
        request_id="r19",
        part_id="p",
        station="s",
        timestamp="2024-05-01T12:00:00Z",
        verdict=Verdict.reject,
        defect_score=0.99,
        thresholds=Thresholds(reject=0.019, review=0.007),
        model_version="v",
        latency_ms=1.0,
    )
    store.record_inspection(result, encode_png(image), heat, "http")
    overlay = decode_image(store.overlay_png("r19"))
    assert overlay.shape == image.shape
    direct = heatmap_overlay(image, store.load_heatmap(store.get_row("r19")["heatmap_path"]))
    assert np.abs(overlay.astype(int) - direct).max() <= 1  # the 16-bit stored map renders as the raw one does
    assert _redness(overlay[round(py), round(px)]) > 40


@pytest.mark.real_data
def test_part_mask_on_real_photos_holds_the_hand_drawn_defects(real_data) -> None:
    """The 30 real photos of tests/data/defect_boxes.json: a silhouette is found on each, it is a part's size,
    and the defects QA must see (boxes drawn by hand) lie inside it, burrs sticking out of the rim mostly."""
    import json
    from pathlib import Path

    from inspection.images import read_image

    entries = json.loads((Path(__file__).resolve().parents[1] / "data" / "defect_boxes.json").read_text())
    for e in entries:
        mask = part_mask(read_image(real_data / "def_front" / e["file"]))
        assert mask is not None, e["file"]
        assert 0.4 < mask.mean() < 0.85, (e["file"], mask.mean())
        for x0, y0, x1, y1 in e["boxes"]:
            assert mask[y0 : y1 + 1, x0 : x1 + 1].mean() > 0.6, (e["file"], (x0, y0, x1, y1))


def test_the_review_side_never_imports_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, inspection.review.app, inspection.review.conflicts, inspection.overlay, inspection.decisions; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
