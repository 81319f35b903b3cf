"""Near-duplicates of parts without a cavity: the general method on demo tiles, the per-image choice, ingest."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspection.images import read_image
from inspection.ingest import IngestConfig, dedup, dedup_general, load_samples, run_ingest
from inspection.synth import render_part
from inspection.synth_tile import make_tile, photograph, render_tile_dataset

THRESHOLD = IngestConfig().near_dup_general_min_similarity
N_TILES, SHOTS = 16, 3


@pytest.fixture(scope="module")
def shots() -> tuple[list[np.ndarray], np.ndarray]:
    """3 re-shots (turned, mirrored, tilted, re-lit) of each of 16 tiles, half of them defective."""
    images, tile_of = [], []
    for i in range(N_TILES):
        tile = make_tile(np.random.default_rng([21, i]), defect=i % 2 == 0)
        for j in range(SHOTS):
            images.append(photograph(np.random.default_rng([21, i, j]), tile)[0])
            tile_of.append(i)
    return images, np.array(tile_of)


def _on_fixture_at(img: np.ndarray, angle: float, mirror: bool) -> np.ndarray:
    """The photo's tile laid at any angle on a larger dark fixture (and mirrored): a new frame size."""
    grey = img[:, :, 0]
    if mirror:
        grey = grey[:, ::-1]
    h, w = grey.shape
    side = int(np.hypot(h, w)) + 20
    canvas = np.full((side, side + 31), int(np.median(grey[:3])), np.uint8)
    y, x = (side - h) // 2, (side + 31 - w) // 2
    canvas[y : y + h, x : x + w] = grey
    m = cv2.getRotationMatrix2D((canvas.shape[1] / 2, canvas.shape[0] / 2), angle, 1.0)
    return cv2.warpAffine(canvas, m, canvas.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def test_each_image_gets_the_method_its_part_allows(shots):
    images, _ = shots
    assert {dedup.features(img).method for img in images} == {dedup.GENERAL}  # no cavity on a tile
    castings = [render_part(np.random.default_rng(s), defect=s % 2 == 0)[0] for s in range(6)]
    assert {dedup.features(img).method for img in castings} == {dedup.IMPELLER}
    f = dedup.features(images[0])
    assert f.descriptor.shape == (dedup_general.DESCRIPTOR_DIM,) and isinstance(f.signature, dedup_general.Signature)
    assert dedup.features(castings[0], dedup.GENERAL).method == dedup.GENERAL  # forced, for stored images


def test_reshots_of_a_tile_score_above_the_threshold_and_other_tiles_below(shots):
    images, tile_of = shots
    sigs = [dedup_general.signature(img[:, :, 0]) for img in images]
    same, other = [], []
    for i, j in itertools.combinations(range(len(images)), 2):
        (same if tile_of[i] == tile_of[j] else other).append(dedup_general.similarity(sigs[i], sigs[j]))
    assert len(same) == N_TILES * 3 and min(same) >= THRESHOLD + 0.15, sorted(same)[:5]
    assert max(other) < THRESHOLD - 0.15, sorted(other)[-5:]


@pytest.mark.parametrize("angle, mirror", [(37.0, False), (-118.0, True), (90.0, True)])
def test_a_tile_lying_at_any_angle_or_mirrored_is_recognised(shots, angle, mirror):
    images, tile_of = shots
    sigs = [dedup_general.signature(img[:, :, 0]) for img in images]
    for i in (0, 7, 20):
        moved = dedup_general.signature(_on_fixture_at(images[i], angle, mirror))
        assert moved.outlined
        scores = dedup_general.similarities(moved, sigs)
        assert scores[tile_of == tile_of[i]].min() >= THRESHOLD, (i, scores[tile_of == tile_of[i]])
        assert scores[tile_of != tile_of[i]].max() < THRESHOLD, (i, scores.max())


def test_descriptor_ignores_the_symmetries_and_finds_the_reshots(shots):
    images, tile_of = shots
    sig = dedup_general.signature(images[3][:, :, 0])
    d = dedup_general.descriptor(sig)
    band = sig.band.astype(np.float32)
    for pose in (band[::-1, ::-1], band[:, ::-1], band[::-1], band.T, band[::-1].T):
        turned = dedup_general.Signature(np.ascontiguousarray(pose).astype(np.float16), sig.aspect, True)
        assert float(d @ dedup_general.descriptor(turned)) == pytest.approx(1.0, abs=1e-3)
    desc = np.stack([dedup.features(img).descriptor for img in images])
    sims = desc @ desc.T
    np.fill_diagonal(sims, -2)
    for i in range(len(images)):  # the other shots of its tile are its nearest neighbours
        nearest = set(np.argsort(-sims[i])[: SHOTS - 1])
        assert nearest == {j for j in range(len(images)) if tile_of[j] == tile_of[i] and j != i}, i


def test_group_general_keeps_tiles_together_and_apart(shots):
    images, tile_of = shots
    feats = [dedup.features(img) for img in images]
    labels = dedup.group_general(
        np.stack([f.descriptor for f in feats]),
        lambda i: feats[i].signature,
        IngestConfig().near_dup_general_max_distance,
        THRESHOLD,
        k=8,
    )
    pairs = list(itertools.combinations(range(len(images)), 2))
    together = sum(labels[i] == labels[j] for i, j in pairs if tile_of[i] == tile_of[j])
    apart = sum(labels[i] != labels[j] for i, j in pairs if tile_of[i] != tile_of[j])
    assert together == N_TILES * 3 and apart == len(pairs) - N_TILES * 3


def test_stored_vector_carries_the_method_and_old_vectors_ask_for_a_recompute(shots):
    images, _ = shots
    casting = render_part(np.random.default_rng(1), defect=False)[0]
    for f in (dedup.features(images[0]), dedup.features(casting)):
        method, desc = dedup.from_stored(dedup.stored_vector(f))
        assert method == f.method and np.array_equal(desc, f.descriptor)
    old = dedup.features(casting).descriptor  # what a store from before the general method kept
    assert dedup.from_stored(old) is None and dedup.from_stored(None) is None


def test_ingest_groups_tiles_and_castings_each_by_their_method(tmp_path: Path):
    from inspection.synth import render_dataset

    render_tile_dataset(tmp_path / "src" / "tiles", 10, seed=3, shots=3)
    render_dataset(tmp_path / "src" / "castings", 6, seed=3)
    store = tmp_path / "store"
    result = run_ingest(IngestConfig(progress=False, workers=2), [tmp_path / "src"], store)
    assert result.accepted == 36 and result.group_methods == {"impeller": 6, "general": 30}
    tile_groups = _tile_groups(store)
    assert len(tile_groups) == 10 and all(len(g) == 1 for g in tile_groups.values())  # each tile: one group
    assert len({next(iter(g)) for g in tile_groups.values()}) == 10  # different tiles: different groups
    assert result.groups == 10 + 6  # every casting is its own part
    assert len({s.split for s in load_samples(store)}) > 1
    again = run_ingest(IngestConfig(progress=False, workers=2), [tmp_path / "src"], store)
    assert again.accepted == 0 and again.group_methods == result.group_methods and again.groups == result.groups

    # a store from before the general method: descriptors without a method code; a new photo of tile 0 arrives
    from inspection.ingest.manifest import MANIFEST_NAME, connect, load_descriptors, save_descriptors

    with connect(store / MANIFEST_NAME) as con:
        paths = dict(con.execute("SELECT sha256, stored_path FROM records WHERE status = 'accepted'"))
        old = {sha: dedup.features(read_image(store / paths[sha])).descriptor for sha in load_descriptors(con)}
        save_descriptors(con, old.items())  # impeller-only stores kept the bare descriptor (no method code)
    tile0 = make_tile(np.random.default_rng([3, 0]), defect=True)
    extra = photograph(np.random.default_rng([3, 0, 99]), tile0)[0]
    cv2.imwrite(str(tmp_path / "src" / "tiles" / "def_front" / "tile_def_3_00000_9.png"), extra[:, :, 0])
    third = run_ingest(IngestConfig(progress=False, workers=2), [tmp_path / "src"], store)
    assert third.accepted == 1 and third.group_methods == {"impeller": 6, "general": 31} and third.groups == 16
    assert len(_tile_groups(store)["tile_def_3_00000"]) == 1  # the new photo joined its tile's group
    with connect(store / MANIFEST_NAME) as con:
        assert all(dedup.from_stored(v) is not None for v in load_descriptors(con).values())  # migrated


def _tile_groups(store: Path) -> dict[str, set[str]]:
    """Tile name (file name without the shot number) -> the groups its photos landed in."""
    from inspection.ingest import read_records

    groups: dict[str, set[str]] = {}
    for rec in read_records(store, status="accepted"):
        stem = Path(rec.source_path).stem
        if stem.startswith("tile_"):
            groups.setdefault(stem.rsplit("_", 1)[0], set()).add(str(rec.group_id))
    return groups
