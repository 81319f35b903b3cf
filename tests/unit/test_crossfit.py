"""Cross-fitting (issue #15): folds by part, thresholds from out-of-fold scores only, golden parts and parts
labelled both ways kept out, intervals on known counts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inspection.config import load_config
from inspection.errors import DataError
from inspection.stats import clopper_pearson_interval, part_rates, wilson_interval
from inspection.train.calibrate import calibrate_threshold
from inspection.train.config import TrainConfig
from inspection.train.crossfit import check_folds, part_folds

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ folds
def test_folds_never_split_a_part_and_stratify_by_label():
    rng = np.random.default_rng(0)
    groups, targets = [], []
    for g in range(60):
        label = int(g % 5 != 0)  # 12 good parts, 48 defective ones, sizes 1..30 photos
        n = int(rng.integers(1, 30))
        groups += [f"g{g}"] * n
        targets += [label] * n
    targets = np.array(targets)
    folds = part_folds(targets, groups, 5, seed=3)
    check_folds(folds, groups)  # raises if a part sits in two folds
    for g in set(groups):
        assert len({int(f) for f, gg in zip(folds, groups, strict=True) if gg == g}) == 1
    for f in range(5):  # every fold holds good and defective parts
        assert set(targets[folds == f]) == {0, 1}
    assert not np.array_equal(folds, part_folds(targets, groups, 5, seed=4))  # the seed matters


def test_folds_refuse_a_class_with_fewer_than_two_parts_and_shrink_k():
    targets = np.array([0, 0, 1, 1, 1])
    with pytest.raises(DataError, match="at least 2 parts of each class"):
        part_folds(targets, ["a", "a", "b", "c", "d"], 5, 0)  # one good part: no fold model could see it
    folds = part_folds(np.array([0, 0, 1, 1, 1, 1]), ["a", "b", "c", "d", "e", "f"], 5, 0)
    assert int(folds.max()) + 1 == 2  # only two good parts: two folds


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic castings, each photographed 3 times (turned, mirrored), one part filed both ways."""
    from inspection.ingest import IngestConfig, run_ingest
    from inspection.synth import render_part

    root = tmp_path_factory.mktemp("grouped")
    for folder in ("def_front", "ok_front"):
        (root / folder).mkdir()
    for i in range(24):
        defect = i % 2 == 0
        img, _ = render_part(np.random.default_rng([11, i]), defect)
        grey = img[:, :, 0]
        shots = [grey, np.rot90(grey, 1), cv2.flip(grey, 1)]
        for j, shot in enumerate(shots):
            folder = "def_front" if defect else "ok_front"
            if i == 1 and j == 2:  # the same good part, one photo filed under defects
                folder = "def_front"
            cv2.imwrite(str(root / folder / f"p{i:02d}_{j}.png"), np.ascontiguousarray(shot))
    store = tmp_path_factory.mktemp("grouped_store")
    result = run_ingest(IngestConfig(progress=False), [root], store)
    assert result.groups == 24, "the turned and mirrored shots of a part must group together"
    assert len(result.mixed_label_parts) == 1
    return store


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fixed random test_efficientnet backbone, loaded as if pretrained (so head mode has features to read)."""
    from inspection.models import build_net

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(build_net("test_efficientnet", pretrained=False).backbone.state_dict(), path)
    return path


def head_config(weights: Path, **overrides) -> TrainConfig:
    base = load_config(TrainConfig, REPO / "configs" / "train_tiny.yaml")
    settings = {
        "mode": "head",
        "pretrained": True,
        "weights": str(weights),
        "validation": "crossfit",
        "folds": 3,
        "head_solver": "lbfgs",
        "taps": (1, 2),
        "plots": False,
        "review_escape_rate": None,
        "review_max_ok_rate": 0.1,
    }
    return replace(base, **{**settings, **overrides})


# ------------------------------------------------------------------------------------------------ cross-fit
def test_every_part_is_scored_by_a_model_that_never_saw_it_and_thresholds_come_from_those_scores(
    grouped_store: Path, tiny_weights: Path, tmp_path: Path, monkeypatch
):
    import inspection.train.fitting as fitting
    from inspection.train import load_run, run_train
    from inspection.train.linear import Platt
    from inspection.train.trainer import predict_scores

    calls: list[np.ndarray] = []
    real = fitting._fit_head

    def spy(config, rows, views, targets, idx):
        calls.append(np.array(idx))
        return real(config, rows, views, targets, idx)

    monkeypatch.setattr(fitting, "_fit_head", spy)
    result = run_train(head_config(tiny_weights), grouped_store, tmp_path / "run")
    run = load_run(tmp_path / "run")
    pool = run.samples["train"]
    groups = np.array([s.group_id for s in pool])
    folds = np.load(tmp_path / "run" / "folds.npy")
    assert len(calls) == 3 + 1  # one model per fold, then the final model on everything
    for f, idx in enumerate(calls[:3]):
        held = np.flatnonzero(folds == f)
        assert not set(groups[idx]) & set(groups[held]), f"fold {f}'s model saw a part it scores"
        assert len(idx) + len(held) == len(pool)
    assert sorted(calls[3].tolist()) == list(range(len(pool)))
    # the thresholds are exactly those of the out-of-fold scores ...
    oof = np.load(tmp_path / "run" / "oof_scores.npy")
    cfg = run.config
    expected = calibrate_threshold(
        oof, [s.label for s in pool], cfg.target_escape_rate, None, None, cfg.review_max_ok_rate
    )
    assert result.card.thresholds == expected
    assert result.card.calibration["split"] == "oof" and result.card.validation.startswith("crossfit")
    # ... which are not the final model's scores on the photos it was fitted on (those are over-confident)
    final = predict_scores(run.net, pool, (300, 300))
    assert np.abs(final - oof).max() > 1e-3
    # and the Platt scaling folded into the head is the card's
    platt = Platt(**result.card.calibration["platt"])
    assert platt.a > 0
    assert set(result.card.part_metrics["oof"]) >= {"accuracy", "defect_recall", "false_reject_rate", "review_share"}


def test_parts_labelled_both_ways_are_kept_out_until_qa_relabels_them(
    grouped_store: Path, tiny_weights: Path, tmp_path: Path
):
    import shutil

    from inspection.ingest import label_conflicts, load_samples, relabel_group
    from inspection.train import run_train

    store = tmp_path / "store"
    shutil.copytree(grouped_store, store)
    (conflict,) = label_conflicts(store)
    assert conflict.counts == {"ok": 2, "defect": 1}
    first = run_train(head_config(tiny_weights), store, tmp_path / "a")
    assert list(first.excluded["mixed_label_parts"]) == [conflict.group_id]
    trained = json.loads((tmp_path / "a" / "training_set.json").read_text())
    assert conflict.group_id not in trained["group_id"]
    assert not {sha for sha, _, _ in conflict.photos} & set(trained["sha256"])

    from datetime import UTC, datetime

    assert relabel_group(store, conflict.group_id, "ok", "qa-anna", datetime.now(UTC)) == 3
    assert label_conflicts(store) == []
    assert {s.label for s in load_samples(store) if s.group_id == conflict.group_id} == {"ok"}
    second = run_train(head_config(tiny_weights), store, tmp_path / "b")
    assert second.excluded["mixed_label_parts"] == {}
    trained = json.loads((tmp_path / "b" / "training_set.json").read_text())
    assert conflict.group_id in trained["group_id"]


def test_golden_parts_never_reach_training_or_calibration_and_the_gate_checks_it(
    grouped_store: Path, tiny_weights: Path, tmp_path: Path
):
    from inspection.export import ExportConfig, export_onnx
    from inspection.registry import Registry, RegistryConfig
    from inspection.train import run_train

    reg = Registry.init(tmp_path / "reg", RegistryConfig(golden_set=str(grouped_store), golden_parts=0.25))
    golden = json.loads((tmp_path / "reg" / "golden.json").read_text())
    golden_groups = {g["group_id"] for g in golden}
    assert len(golden_groups) >= 2 and {g["label"] for g in golden} == {"ok", "defect"}
    # whole parts: every photo of a golden part is golden
    from inspection.ingest import load_samples

    per_group = {}
    for s in load_samples(grouped_store):
        per_group.setdefault(s.group_id, set()).add(s.sha256)
    assert all(per_group[g] <= {i["sha256"] for i in golden} for g in golden_groups)

    result = run_train(head_config(tiny_weights, exclude=str(tmp_path / "reg")), grouped_store, tmp_path / "run")
    trained = json.loads((tmp_path / "run" / "training_set.json").read_text())
    assert not golden_groups & set(trained["group_id"])
    assert not {g["sha256"] for g in golden} & set(trained["sha256"])
    assert result.excluded["golden_parts"] == len(golden_groups)
    pool = json.loads((tmp_path / "run" / "samples.json").read_text())["train"]
    assert len(np.load(tmp_path / "run" / "oof_scores.npy")) == len(pool)  # calibrated on the pool only
    assert not golden_groups & {p["group_id"] for p in pool}

    export = ExportConfig(max_parity_images=8)
    clean = reg.register(export_onnx(export, tmp_path / "run", tmp_path / "e1").out)
    assert reg.golden_overlap(clean) is None
    gate = reg.gate(clean)
    assert "golden set:" in gate.reason and "parts mostly" in gate.reason  # the gate states its intervals

    run_train(head_config(tiny_weights, seed=1), grouped_store, tmp_path / "leaky")  # no exclude
    leaky = reg.register(export_onnx(export, tmp_path / "leaky", tmp_path / "e2").out)
    report = reg.gate(leaky)
    assert not report.promoted and "was trained on" in report.reason
    assert not reg.promote(leaky).promoted


# ------------------------------------------------------------------------------------------------ intervals
def test_intervals_match_known_counts():
    # reference values: scipy.stats.binomtest(k, n).proportion_ci(method="exact" / "wilson")
    lo, hi = clopper_pearson_interval(0, 41)
    assert lo == 0.0 and hi == pytest.approx(0.0860438, abs=1e-6)  # 41 good parts, none misjudged
    lo, hi = clopper_pearson_interval(3, 41)
    assert (lo, hi) == pytest.approx((0.0153515, 0.1992460), abs=1e-6)
    lo, hi = wilson_interval(18, 3700)
    assert (lo, hi) == pytest.approx((0.0030795, 0.0076773), abs=1e-6)
    assert clopper_pearson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


def test_part_rates_count_photos_and_parts():
    # 3 parts of 10 photos; part a: all 10 hit, part b: 2 hit, part c: none
    groups = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    hits = [True] * 10 + [True, True] + [False] * 8 + [False] * 10
    rates = part_rates(hits, groups, n_boot=500, seed=1)
    assert rates["photo"].k == 12 and rates["photo"].n == 30 and rates["photo"].value == pytest.approx(0.4)
    assert rates["part"].value == pytest.approx((1.0 + 0.2 + 0.0) / 3) and rates["part"].n == 3
    assert rates["part_mostly"].k == 1 and rates["part_mostly"].n == 3  # only part a mostly hit
    assert rates["part_mostly"].low == pytest.approx(clopper_pearson_interval(1, 3)[0])
    # the bootstrap over parts is wider than Wilson on photos: 30 photos of 3 parts prove little
    assert rates["photo"].high - rates["photo"].low > rates["photo_wilson"].high - rates["photo_wilson"].low
    assert rates["photo"].low <= 0.4 <= rates["photo"].high


# ------------------------------------------------------------------------------------------------ auto
def test_auto_mode_picks_by_cross_validation_within_its_budget_and_says_why(
    grouped_store: Path, tiny_weights: Path, tmp_path: Path
):
    from inspection.train import run_train

    config = head_config(tiny_weights, mode="auto", epochs=1, folds=2, cached_views=0, trainable_blocks=1)
    result = run_train(replace(config, auto_budget_s=3600), grouped_store, tmp_path / "all")
    report = json.loads((tmp_path / "all" / "auto.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    by_name = {c["name"]: c for c in report["candidates"]}
    # native size, the camera's size, the multiple-instance head at the better head's input, then fine-tuning the
    # last two stages and the last one at the best head's input and pooling
    heads = [by_name["head-224"], by_name["head-300"]]
    first = min(heads, key=lambda c: (c["frr_at_selection"], -c["oof_auc"], c["input_size"]))
    lse = f"{first['name']}-lse"
    best = min([*heads, by_name[lse]], key=lambda c: (c["frr_at_selection"], -c["oof_auc"], c["input_size"]))
    tuned = f"partial-{best['input_size']}" + ("-lse" if best["pooling"] == "lse" else "")
    assert names == ["head-224", "head-300", lse, f"{tuned}-2stages", tuned]
    assert by_name[lse]["pooling"] == "lse" and by_name[tuned]["pooling"] == best["pooling"]
    evaluated = [c for c in report["candidates"] if c["status"] in ("evaluated", "chosen")]
    assert len(evaluated) == 5
    # ranked where at least 5 defect photos may escape: the target alone would rest on one or two photos here
    assert report["selection_escape_rate"] >= report["target_escape_rate"]
    assert all(c["frr_at_selection"] <= c["frr_at_target"] for c in evaluated)
    (chosen,) = [c for c in report["candidates"] if c["status"] == "chosen"]
    best = min(evaluated, key=lambda c: (c["frr_at_selection"], -c["oof_auc"], c["input_size"]))
    assert chosen["name"] == best["name"] == report["chosen"]
    assert result.card.mode == chosen["mode"] and result.card.preprocess["input_size"] == chosen["input_size"]
    assert "mode auto" in result.card.validation and chosen["name"] in report["why"]
    saved = load_config(TrainConfig, tmp_path / "all" / "config.yaml")
    assert saved.mode == chosen["mode"]  # the run records the resolved recipe, so export and load_run agree

    # a budget the first candidate already uses up on any machine (1 ms): the others are skipped, with the reason
    tight = run_train(replace(config, auto_budget_s=1e-3), grouped_store, tmp_path / "tight")
    report = json.loads((tmp_path / "tight" / "auto.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["candidates"]}
    assert statuses == {
        "head-224": "chosen",
        "head-300": "skipped",
        "head-224-lse": "skipped",
        "partial-224-2stages": "skipped",
        "partial-224": "skipped",
    }
    assert all("budget" in c["reason"] for c in report["candidates"] if c["status"] == "skipped")
    assert tight.card.mode == "head"


def test_auto_skips_the_multiple_instance_head_when_its_grid_would_not_fit_in_memory(
    grouped_store: Path, tiny_weights: Path, tmp_path: Path
):
    from inspection.errors import ConfigError
    from inspection.train import run_train

    config = head_config(tiny_weights, mode="auto", auto_modes=("head",), folds=2, max_cache_gb=1e-6)
    run_train(replace(config, auto_budget_s=3600), grouped_store, tmp_path / "auto")
    report = json.loads((tmp_path / "auto" / "auto.json").read_text())
    (lse,) = [c for c in report["candidates"] if c["pooling"] == "lse"]
    assert lse["status"] == "skipped" and "GiB" in lse["reason"] and "max_cache_gb" in lse["reason"]
    assert lse["name"] in report["why"]
    # asked for by hand, the same limit is a clear error before any work
    with pytest.raises(ConfigError, match="max_cache_gb"):
        run_train(replace(config, mode="head", head_pooling="lse"), grouped_store, tmp_path / "by_hand")
    assert not (tmp_path / "by_hand" / "checkpoint.pt").exists()
