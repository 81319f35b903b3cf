"""`run_adapt` end to end on the tiny run: an ordinary run directory, only BN statistics changed without labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inspection.adapt import AdaptConfig, run_adapt
from inspection.adapt.bn_adapt import batchnorm_layers
from inspection.adapt.config import GapConfig
from inspection.drift import REFERENCE_FILE, DriftReference
from inspection.errors import ConfigError
from inspection.images import encode_png, read_image

FAST = AdaptConfig(max_source_images=64, batch_size=16, labelled_epochs=3, gap=GapConfig(calibration_splits=3))


def _shifted_folder(src: Path, out: Path, n: int = 40) -> Path:
    """Night shift: darker with sensor noise."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(src.rglob("*.png"))[:: max(1, 80 // n)]):
        im = read_image(path).astype(np.float32)
        dark = np.clip(im * 0.45 + rng.normal(0, 12, im.shape), 0, 255).astype(np.uint8)
        sub = out / path.parent.name
        sub.mkdir(exist_ok=True)
        (sub / f"{i:03d}.png").write_bytes(encode_png(dark))
    return out


@pytest.fixture(scope="module")
def night_dir(synth_dir, tmp_path_factory):
    return _shifted_folder(synth_dir, tmp_path_factory.mktemp("night"))


@pytest.fixture(scope="module")
def adapted(tiny_run, night_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapted") / "run"
    return run_adapt(FAST, tiny_run, night_dir, out), out


def test_adapted_run_is_an_ordinary_run_directory(tiny_run, adapted):
    from inspection.train import load_run

    result, out = adapted
    parent = load_run(tiny_run)
    child = load_run(out)
    assert child.card.mode == "adapted"
    assert child.card.parent_version == parent.card.version == result.parent_version
    assert child.card.version == result.version != parent.card.version
    assert child.card.thresholds == parent.card.thresholds
    report = json.loads((out / "adapt.json").read_text())
    assert report["gap_before"]["score"] > 0 and report["gap_after"] is not None
    assert report["n_target"] == result.n_target > 0
    assert (out / "adapt_config.yaml").is_file()
    ref = DriftReference.load(out / REFERENCE_FILE)
    assert ref.n == result.n_target and "verdict" in ref.shares


def test_no_label_adaptation_changes_only_batchnorm_statistics(tiny_run, adapted):
    _, out = adapted
    before = torch.load(tiny_run / "checkpoint.pt", weights_only=True)["model_state"]
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model_state"]
    from inspection.train import load_run

    names = batchnorm_layers(load_run(tiny_run).net)
    stat_keys = {f"{n}.{s}" for n in names for s in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= stat_keys, sorted(changed - stat_keys)[:5]


def test_adaptation_narrows_the_gap_on_a_strong_shift(adapted):
    result, _ = adapted
    assert result.gap_before.warning  # a 55 % darker line with noise is far from the training images
    assert result.gap_after.score < result.gap_before.score


def test_labelled_fine_tuning_changes_head_and_bn_affine_only(tiny_run, night_dir, tmp_path):
    out = tmp_path / "run"
    result = run_adapt(FAST, tiny_run, night_dir, out, labelled=night_dir)
    assert result.labelled is not None and result.labelled.n_images > 0
    before = torch.load(tiny_run / "checkpoint.pt", weights_only=True)["model_state"]
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model_state"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("head.") for k in changed)
    from inspection.train import load_run

    bn = {
        f"{n}.{s}"
        for n in batchnorm_layers(load_run(tiny_run).net)
        for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    assert changed <= bn | {"head.weight", "head.bias"}


def test_existing_output_is_refused_and_left_alone(tiny_run, night_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        run_adapt(FAST, tiny_run, night_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="source run itself"):
        run_adapt(FAST, tiny_run, night_dir, tiny_run)


def test_cli_adapt_and_gap_print_json(tiny_run, night_dir, synth_dir, tmp_path, capsys):
    from inspection.cli import main

    out = tmp_path / "cli_run"
    args = ["adapt", str(tiny_run), "max_source_images=32", "gap.calibration_splits=2"]
    assert main([*args, "--target", str(night_dir), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_dir"] == str(out) and (out / "checkpoint.pt").is_file()
    assert main(["gap", str(synth_dir), str(night_dir), "calibration_splits=3", "--run", str(tiny_run)]) == 0
    gap = json.loads(capsys.readouterr().out)
    assert {"score", "noise_floor", "warn_level", "warning", "message"} <= set(gap)
    assert gap["halves"] == "random"  # loose photos: nothing says which show the same part
    assert main(["gap", str(tiny_run), str(night_dir), "calibration_splits=3"]) == 0  # the run's own photos
    by_part = json.loads(capsys.readouterr().out)
    assert by_part["halves"] == "parts" and by_part["features"] == str(tiny_run)
    assert by_part["score"] > 0 and by_part["warn_level"] > 0
    assert main(["adapt", str(tiny_run), "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 1
    assert "image folder not found" in capsys.readouterr().err


def test_drift_reference_of_a_trained_run(tiny_run, tmp_path):
    import shutil

    from inspection.adapt import write_drift_reference
    from inspection.drift import DriftMonitor

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ref = write_drift_reference(run, split="train")  # the tiny synthetic val split is below 20 images
    monitor = DriftMonitor.for_model_dir(run)
    assert monitor.reference == ref and ref.n >= 10 and "verdict" in ref.shares


def test_flow_task_calls_run_adapt(tiny_run, night_dir, tmp_path):
    from flows.adapt_flow import adapt_run

    out = tmp_path / "flow_run"
    report = adapt_run.fn(
        str(tiny_run), str(night_dir), str(out), None, None, ["max_source_images=32", "gap.calibration_splits=2"]
    )
    assert report["run_dir"] == str(out) and (out / "model_card.json").is_file()
