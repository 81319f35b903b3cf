"""Ingest of a few hundred real casting photos: copies we make are grouped, groups verify, no group crosses splits."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspection.images import read_image
from inspection.ingest import IngestConfig, dedup, load_samples, read_records, run_ingest

PER_CLASS = 150
CFG = IngestConfig(progress=False, workers=2)


def _rotate(img: np.ndarray, angle: float, zoom: float = 1.0) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, zoom)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


COPIES = {
    "r37z": lambda im: _rotate(im, 37, 1.05),
    "flip_r113": lambda im: _rotate(np.ascontiguousarray(im[:, ::-1]), 113),
    "vflip": lambda im: np.ascontiguousarray(im[::-1]),
}


@pytest.fixture(scope="module")
def real_store(real_data: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("real")
    src = root / "src"
    made: dict[str, list[str]] = {}
    for folder in ("def_front", "ok_front"):
        files = sorted((real_data / folder).glob("*.jp*g"))
        picked = files[:: max(1, len(files) // PER_CLASS)][:PER_CLASS]
        (src / folder).mkdir(parents=True)
        for p in picked:
            shutil.copy(p, src / folder / p.name)
        for p in picked[:: PER_CLASS // 4][:4]:  # 4 originals per class get copies we know are the same part
            img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            made[p.stem] = []
            for tag, fn in COPIES.items():
                name = f"{p.stem}_{tag}"
                cv2.imwrite(str(src / folder / f"{name}.jpg"), fn(img), [cv2.IMWRITE_JPEG_QUALITY, 88])
                made[p.stem].append(name)
    store = root / "store"
    result = run_ingest(CFG, [src], store)
    return store, result, made


@pytest.mark.real_data
def test_made_copies_of_real_photos_share_their_original_group(real_store):
    store, result, made = real_store
    assert result.n_quarantined == 0
    by_stem = {Path(r.source_path).stem: r for r in read_records(store, status="accepted")}
    for original, copies in made.items():
        groups = {by_stem[original].group_id} | {by_stem[c].group_id for c in copies}
        assert len(groups) == 1, f"copies of {original} split over {groups}"


@pytest.mark.real_data
def test_no_real_group_crosses_splits(real_store):
    store, _, _ = real_store
    splits = defaultdict(set)
    for s in load_samples(store):
        splits[s.group_id].add(s.split)
    assert splits and all(len(v) == 1 for v in splits.values())
    assert {next(iter(v)) for v in splits.values()} == {"train", "val", "test"}


@pytest.mark.real_data
def test_real_groups_verify_directly_and_different_groups_do_not(real_store):
    """Every group is held together by direct verification, not a chain: a typical member pair scores above the
    threshold; pairs from different groups almost never do."""
    store, _, _ = real_store
    samples = load_samples(store)
    sigs = {s.sha256: dedup.features(read_image(s.path))[1] for s in samples}
    members = defaultdict(list)
    for s in samples:
        members[s.group_id].append(s.sha256)
    threshold = CFG.near_dup_min_similarity
    multi = [m for m in members.values() if len(m) > 1]
    assert multi, "no near-duplicate group found among the real photos"
    for m in multi:
        sample = m[:: max(1, len(m) // 6)][:6]
        cross = [dedup.aligned_similarity(sigs[a], sigs[b]) for i, a in enumerate(sample) for b in sample[i + 1 :]]
        assert np.median(cross) >= threshold, (len(m), np.round(cross, 2))
    rng = np.random.default_rng(0)
    shas = list(sigs)
    group_of = {s.sha256: s.group_id for s in samples}
    pairs = [
        (shas[i], shas[j]) for i, j in rng.integers(0, len(shas), (600, 2)) if group_of[shas[i]] != group_of[shas[j]]
    ]
    scores = np.array([dedup.aligned_similarity(sigs[a], sigs[b]) for a, b in pairs])
    assert np.mean(scores >= threshold) < 0.01, np.sort(scores)[-10:]
