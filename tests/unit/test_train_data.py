"""Training data: augmentations, mixed camera sizes, class balance, per-class subsets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection.images import encode_png
from inspection.train.config import AugmentConfig
from inspection.train.data import (
    ImageDataset,
    balanced_sampler,
    build_augment,
    common_size,
    make_sample,
    pos_weight_for,
    split_samples,
)


def _write(path: Path, h: int, w: int, value: int = 128) -> Path:
    img = np.full((h, w, 3), value, dtype=np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = 255 - value
    path.write_bytes(encode_png(img))
    return path


def test_augment_pipeline_keeps_uint8_camera_frames():
    aug = build_augment(AugmentConfig(rotate_p=1.0, noise_p=1.0, blur_p=1.0), seed=0)
    img = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    out = aug(image=img)["image"]
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert not np.array_equal(out, img)
    noise = next(t for t in aug.transforms if type(t).__name__ == "GaussNoise")
    assert tuple(noise.std_range) == AugmentConfig().noise_std_range  # std_range, not the ignored var_limit
    rotate = next(t for t in aug.transforms if type(t).__name__ == "Rotate")
    assert tuple(rotate.limit) == (-180, 180)
    assert build_augment(AugmentConfig(enabled=False)) is None


def test_augment_is_seeded():
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a = build_augment(AugmentConfig(), seed=5)(image=img)["image"]
    b = build_augment(AugmentConfig(), seed=5)(image=img)["image"]
    assert np.array_equal(a, b)


def test_mixed_camera_sizes_are_resized_to_the_most_common(tmp_path: Path):
    paths = [_write(tmp_path / f"a{i}.png", 120, 100) for i in range(3)] + [_write(tmp_path / "b.png", 60, 80)]
    samples = [make_sample(p, f"{i:064d}", "ok", "train", str(i)) for i, p in enumerate(paths)]
    assert common_size(samples) == (120, 100)
    ds = ImageDataset(samples, (120, 100))
    batch = torch.stack([ds[i][0] for i in range(len(ds))])
    assert batch.shape == (4, 120, 100, 3) and batch.dtype == torch.uint8


def test_class_imbalance_weights_and_sampler():
    targets = np.array([0] * 90 + [1] * 10)
    assert pos_weight_for(targets) == pytest.approx(9.0)
    drawn = list(balanced_sampler(targets, torch.Generator().manual_seed(0)))
    share = Counter(int(targets[i]) for i in drawn)[1] / len(drawn)
    assert 0.35 < share < 0.65  # the minority class is drawn about as often as the majority


def test_max_per_class_keeps_both_classes_and_is_seeded(tmp_path: Path):
    samples = [
        make_sample(tmp_path / f"{i}.png", f"{i:064d}", "defect" if i % 3 == 0 else "ok", split, str(i))
        for i, split in enumerate(["train"] * 60 + ["val"] * 6)
    ]
    a = split_samples(samples, max_per_class=5, seed=1)
    b = split_samples(samples, max_per_class=5, seed=1)
    c = split_samples(samples, max_per_class=5, seed=2)
    assert Counter(s.label for s in a["train"]) == {"ok": 5, "defect": 5}
    assert [s.sha256 for s in a["train"]] == [s.sha256 for s in b["train"]]
    assert [s.sha256 for s in a["train"]] != [s.sha256 for s in c["train"]]
    assert len(a["val"]) == 6  # only training data is subsampled
