"""Near-duplicate grouping: part centre and scale, rotation/mirror/zoom-invariant scores, no chaining."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspection.ingest import dedup
from inspection.ingest.config import IngestConfig
from inspection.synth import render_part

THRESHOLD = IngestConfig().near_dup_min_similarity


def _part(seed: int, defect: bool = False) -> np.ndarray:
    return render_part(np.random.default_rng(seed), defect, 300)[0][:, :, 0]


def _warp(img: np.ndarray, angle: float, zoom: float = 1.0, shift: tuple[float, float] = (0, 0)) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
    m[:, 2] += shift
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), m


def _jpeg(img: np.ndarray, quality: int = 85) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def parts() -> list[np.ndarray]:
    return [_part(seed, defect=seed % 2 == 0) for seed in range(6)]


def test_centre_follows_the_part_to_subpixel_under_rotation_zoom_and_shift(parts):
    for img in parts[:3]:
        cx, cy, r = dedup.find_centre(img)
        for angle, zoom, shift in ((37, 1.0, (0, 0)), (113, 1.1, (12, -9)), (250, 0.9, (-15, 7))):
            moved, m = _warp(img, angle, zoom, shift)
            mx, my, mr = dedup.find_centre(_jpeg(moved))
            ex, ey = m @ np.array([cx, cy, 1.0])
            assert np.hypot(mx - ex, my - ey) < 0.6, (angle, zoom, (mx, my), (ex, ey))
            assert abs(mr / (r * zoom) - 1) < 0.02


def test_centre_falls_back_to_image_centre_on_a_blank_image():
    cx, cy, r = dedup.find_centre(np.full((100, 120), 128, np.uint8))
    assert (cx, cy) == (59.5, 49.5) and r > 0


@pytest.mark.parametrize(
    "variant",
    [
        ("r37", lambda im: _warp(im, 37)[0]),
        ("r113", lambda im: _warp(im, 113)[0]),
        ("mirror", lambda im: np.ascontiguousarray(im[:, ::-1])),
        ("mirror_r221_zoom", lambda im: _warp(np.ascontiguousarray(im[::-1]), 221, 1.08, (10, -6))[0]),
    ],
    ids=lambda v: v[0],
)
def test_copies_score_above_threshold_and_other_parts_below(parts, variant):
    _, fn = variant
    sigs = [dedup.features(p)[1] for p in parts]
    for i, img in enumerate(parts[:3]):
        copy = dedup.features(_jpeg(fn(img)))[1]
        scores = dedup.aligned_similarities(copy, np.stack(sigs))
        assert scores[i] >= THRESHOLD, (i, scores)
        others = np.delete(scores, i)
        assert others.max() < THRESHOLD, (i, scores)


def test_descriptor_is_invariant_to_rotation_and_mirror(parts):
    d = np.stack([dedup.features(p)[0] for p in parts])
    img = parts[1]
    for copy in (_warp(img, 77)[0], np.ascontiguousarray(img[::-1]), _warp(img, 151, 1.05)[0]):
        dc = dedup.features(_jpeg(copy))[0]
        assert dc.shape == (dedup.DESCRIPTOR_DIM,)
        assert int(np.argmax(d @ dc)) == 1


def test_aligned_similarity_is_exact_for_circular_shifts_and_reversal():
    rng = np.random.default_rng(0)
    sig = rng.normal(size=(128, 32)).astype(np.float32)
    sig /= np.linalg.norm(sig)
    others = np.stack([np.roll(sig, 41, axis=0), np.roll(sig[::-1], 7, axis=0), rng.normal(size=(128, 32)) / 64])
    got = dedup.aligned_similarities(sig, others)
    assert got[0] == pytest.approx(1.0, abs=1e-5) and got[1] == pytest.approx(1.0, abs=1e-5)
    assert got[2] < 0.2
    assert dedup.aligned_similarities(sig, np.zeros((0, 128, 32))).shape == (0,)


def test_a_bridge_pair_does_not_chain_two_groups():
    """Two tight groups A and B with one look-alike pair between them stay apart (single linkage would merge)."""
    rng = np.random.default_rng(3)
    base_a, base_b = rng.normal(size=(2, 128, 32)).astype(np.float32)
    bridge = 0.5 * (base_a + base_b)  # looks like both

    def noisy(base: np.ndarray) -> np.ndarray:
        s = base + 0.25 * rng.normal(size=base.shape).astype(np.float32)
        return s / np.linalg.norm(s)

    sigs = [noisy(base_a) for _ in range(4)] + [noisy(base_b) for _ in range(4)] + [bridge / np.linalg.norm(bridge)]
    sigs = np.stack(sigs)
    # descriptors close for everything: candidate search proposes all pairs
    desc = np.ones((len(sigs), 4), np.float32) / 2
    threshold = 0.6
    pair_scores = dedup.aligned_similarities(sigs[8], sigs[:8])
    assert pair_scores.min() >= threshold  # the bridge verifies against every member of both groups
    labels = dedup.group_near_duplicates(desc, lambda i: sigs[i], max_distance=0.5, min_similarity=threshold, k=8)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:8])) == 1
    assert labels[0] != labels[4], "single-linkage chaining through the bridge image"


def test_candidate_pairs_respect_k_and_distance():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(50, 8)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    d[1] = d[0]
    pairs = dedup.candidate_pairs(d, max_distance=1e-4, k=3)
    assert (0, 1) in pairs and all(i < j for i, j in pairs)
    assert len(dedup.candidate_pairs(d, max_distance=2.0, k=3)) <= 50 * 3
    assert dedup.candidate_pairs(d[:1], max_distance=2.0, k=3) == []
