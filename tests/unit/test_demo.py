"""`inspection demo` plumbing for the demo parts (the full run is `make demo`; it takes minutes)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from inspection.config import load_config
from inspection.demo import TRAIN_CONFIGS, DemoConfig, _render, add_arguments, run_demo
from inspection.errors import DataError
from inspection.train import TrainConfig


def test_each_part_has_a_training_recipe_and_tiles_letterbox():
    assert set(TRAIN_CONFIGS) == {"impeller", "tile"}
    impeller = load_config(TrainConfig, TRAIN_CONFIGS["impeller"])
    tile = load_config(TrainConfig, TRAIN_CONFIGS["tile"])
    assert impeller.resize == "squash" and tile.resize == "letterbox" and tile.input_size == impeller.input_size


def test_demo_renders_tiles_with_several_photos_each(tmp_path: Path):
    _render(DemoConfig(part="tile"), tmp_path / "tiles", 7, seed=1, shots=3)  # 7 photos -> 3 tiles, 9 photos
    names = sorted(p.name for p in (tmp_path / "tiles").rglob("*.png"))
    assert len(names) == 9 and all(n.startswith("tile_") for n in names)
    _render(DemoConfig(), tmp_path / "castings", 4, seed=1, shots=3)
    assert len(list((tmp_path / "castings").rglob("cast_*.png"))) == 4


def test_cli_takes_the_part(tmp_path: Path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).part == "impeller"
    args = parser.parse_args(["--part", "tile", "--out", str(tmp_path)])
    assert args.part == "tile" and args.train_config is None
    with pytest.raises(DataError, match="part"):
        run_demo(DemoConfig(out=tmp_path / "x", part="plate"))
