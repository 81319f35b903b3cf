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


# -- tiles -----------------------------------------------------------------------------------------------------


def test_tiles_are_non_square_of_varied_size_with_local_defect_masks():
    from inspection.synth_tile import MAX_WIDTH, MIN_SIDE, render_tile

    shapes, kinds_seen = set(), set()
    for seed in range(24):
        img, mask = render_tile(np.random.default_rng(seed), defect=True)
        h, w = img.shape[:2]
        assert img.dtype == np.uint8 and img.shape[2] == 3 and (img[..., 0] == img[..., 2]).all()
        assert mask.shape == (h, w) and mask.dtype == bool
        assert min(h, w) >= MIN_SIDE and max(h, w) <= MAX_WIDTH and not 0.87 < w / h < 1.15  # never square
        assert mask.sum() > 0 and mask.mean() < 0.08, seed  # a few pixels to tens of pixels
        shapes.add((h, w))
        ok, ok_mask = render_tile(np.random.default_rng(seed), defect=False)
        assert not ok_mask.any()
    assert len(shapes) == 24
    widths = [w for _, w in shapes]
    assert min(widths) < 250 and max(widths) > 450  # about 120 to 630 px wide
    from inspection.synth_tile import make_tile

    for seed in range(40):
        kinds_seen.update(make_tile(np.random.default_rng(seed), defect=True).kinds)
    assert kinds_seen == {"blowhole", "crack", "chip", "fray", "uneven"}


def test_defect_masks_mark_changed_pixels_and_follow_the_photo():
    from inspection.synth_tile import make_tile, photograph

    for seed in range(6):
        rng = np.random.default_rng(seed)
        tile = make_tile(rng, defect=True)
        clean = make_tile(np.random.default_rng(seed), defect=False)  # same draws up to the defects
        assert tile.surface.shape == clean.surface.shape
        changed = np.abs(tile.surface - clean.surface) > 3
        assert tile.mask.any() and changed[tile.mask > 0].mean() > 0.3, seed
        img, mask = photograph(np.random.default_rng([seed, 1]), tile)
        assert mask.sum() == pytest.approx(tile.mask.sum(), rel=0.15)  # turned, flipped, tilted with the photo
        assert img.shape[:2] == mask.shape


def test_tile_dataset_layout_determinism_and_several_photos_per_tile(tmp_path):
    from inspection.synth_tile import render_tile_dataset

    counts = render_tile_dataset(tmp_path / "a", 4, seed=2, shots=3)
    render_tile_dataset(tmp_path / "b", 4, seed=2, shots=3)
    render_tile_dataset(tmp_path / "c", 5, seed=2, shots=3)  # one more tile: the first four unchanged
    assert counts == {"defect": 6, "ok": 6}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert {p.parent.name for p in files} == {"def_front", "ok_front"}  # ingest's default label map
    assert sorted(p.name for p in files)[:3] == [f"tile_def_2_00000_{j}.png" for j in range(3)]
    for rel in files:
        data = (tmp_path / "a" / rel).read_bytes()
        assert data == (tmp_path / "b" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes()
    import cv2

    shots = [cv2.imread(str(tmp_path / "a" / "def_front" / f"tile_def_2_00000_{j}.png"), 0) for j in range(3)]
    assert len({s.tobytes() for s in shots}) == 3  # re-shots, not copies
    assert {tuple(sorted(s.shape)) for s in shots} == {tuple(sorted(shots[0].shape))}  # one tile, turned or not
    with pytest.raises(ValueError, match="shots"):
        render_tile_dataset(tmp_path / "d", 2, seed=0, shots=0)


def test_synth_cli_renders_tiles(tmp_path, capsys):
    from inspection.cli import main

    assert main(["synth", "--part", "tile", "--out", str(tmp_path / "t"), "--n", "2", "--shots", "2"]) == 0
    assert '"tiles": 2' in capsys.readouterr().out
    assert len(list((tmp_path / "t").rglob("*.png"))) == 4
    assert main(["synth", "--part", "tile", "--out", str(tmp_path / "u"), "--n", "2", "--size", "300"]) == 1
    assert "--size applies to --part impeller" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "c"), "--n", "2"]) == 0  # impeller stays the default
    assert len(list((tmp_path / "c" / "def_front").glob("cast_def_*.png"))) == 1
