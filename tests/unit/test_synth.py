"""Built-in demo castings: determinism, layout, masks, variety."""

from __future__ import annotations

import numpy as np
import pytest

from inspection.synth import render_dataset, render_part


def test_render_part_shapes_and_mask():
    img, mask = render_part(np.random.default_rng(0), defect=True)
    assert img.shape == (300, 300, 3) and img.dtype == np.uint8
    assert mask.shape == (300, 300) and mask.dtype == bool
    assert mask.any() and mask.mean() < 0.1  # a defect is a local thing
    assert (img[:, :, 0] == img[:, :, 1]).all()  # grey, like the line camera
    ok, ok_mask = render_part(np.random.default_rng(0), defect=False, size=128)
    assert ok.shape == (128, 128, 3) and not ok_mask.any()


def test_defect_changes_pixels_under_the_mask():
    for seed in range(8):
        img, mask = render_part(np.random.default_rng(seed), defect=True)
        assert mask.any(), seed


def test_same_seed_same_images_different_seed_different(tmp_path):
    a = render_dataset(tmp_path / "a", 6, seed=3)
    render_dataset(tmp_path / "b", 6, seed=3)
    render_dataset(tmp_path / "c", 6, seed=4)
    assert a == {"defect": 3, "ok": 3}
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files_a) == 6
    assert {p.parent.name for p in files_a} == {"def_front", "ok_front"}
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    c_bytes = {p.read_bytes() for p in (tmp_path / "c").rglob("*.png")}
    assert not c_bytes & {(tmp_path / "a" / rel).read_bytes() for rel in files_a}


def test_parts_vary_in_position_and_rotation():
    imgs = [render_part(np.random.default_rng(s), False)[0][:, :, 0].astype(float) for s in range(5)]
    diffs = [np.abs(imgs[0] - other).mean() for other in imgs[1:]]
    assert min(diffs) > 3.0


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="defect_fraction"):
        render_dataset(tmp_path, 4, 0, defect_fraction=1.5)
    with pytest.raises(ValueError, match="at least 64"):
        render_part(np.random.default_rng(0), False, size=16)
