"""Threshold calibration: the reject threshold meets the requested escape rate on known scores, and is the highest."""

from __future__ import annotations

import numpy as np
import pytest

from inspection.errors import DataError
from inspection.schemas import Thresholds
from inspection.thresholds import verdicts_for
from inspection.train import calibrate_threshold
from inspection.train.calibrate import calibration_report, rates_at


def _escape_rate(scores: np.ndarray, targets: np.ndarray, t: float) -> float:
    return float((scores[targets == 1] < t).mean())


def test_reject_threshold_on_known_scores():
    # 10 defects; 10% target allows exactly one escape: the threshold is the 2nd lowest defect score
    defect = np.array([0.15, 0.3, 0.55, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99])
    ok = np.array([0.01, 0.05, 0.1, 0.2, 0.4])
    scores = np.concatenate([defect, ok])
    labels = ["defect"] * 10 + ["ok"] * 5
    t = calibrate_threshold(scores, labels, target_escape_rate=0.1)
    assert t.reject == pytest.approx(0.3)
    assert t.review == t.reject  # no band asked for
    # zero escapes allowed: the lowest defect score
    assert calibrate_threshold(scores, labels, 0.0).reject == pytest.approx(0.15)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.0, 0.005, 0.02, 0.1, 0.3])
def test_escape_rate_met_and_threshold_is_highest(seed: int, target: float):
    rng = np.random.default_rng(seed)
    n_def = int(rng.integers(20, 400))
    scores = np.concatenate([rng.beta(5, 2, n_def), rng.beta(2, 5, 500)])
    targets = np.array([1] * n_def + [0] * 500)
    t = calibrate_threshold(scores, targets, target).reject
    assert _escape_rate(scores, targets, t) <= target
    # any higher threshold (the next score above it) breaks the target: t is the highest that meets it
    higher = np.sort(scores[scores > t])
    if higher.size:
        assert _escape_rate(scores, targets, float(higher[0])) > target
    # and the shared verdict rule agrees: no more than target of the defects pass
    verdicts = verdicts_for(scores[targets == 1], Thresholds(reject=t, review=t))
    assert (verdicts == "pass").mean() <= target


def test_ties_at_the_threshold_do_not_exceed_the_target():
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.9, 0.1])
    labels = [1, 1, 1, 1, 1, 0]
    t = calibrate_threshold(scores, labels, 0.2).reject  # one escape allowed of five
    assert _escape_rate(scores, np.array(labels), t) <= 0.2
    assert t == pytest.approx(0.5)


def test_review_band_for_a_stricter_escape_target():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.beta(5, 2, 200), rng.beta(2, 5, 800)])
    targets = np.array([1] * 200 + [0] * 800)
    t = calibrate_threshold(scores, targets, target_escape_rate=0.05, review_escape_rate=0.0)
    assert t.review <= t.reject
    assert t.review == pytest.approx(scores[targets == 1].min())
    verdicts = verdicts_for(scores, t)
    assert not ((verdicts == "pass") & (targets == 1)).any()  # nothing defective passes unseen on val
    assert _escape_rate(scores, targets, t.reject) <= 0.05


def test_review_fraction_and_report():
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.75])
    labels = ["defect", "defect", "defect", "ok", "ok", "ok"]
    t = calibrate_threshold(scores, labels, 0.0, review_fraction=0.5)
    assert t.reject == pytest.approx(0.7)
    assert t.review == pytest.approx(0.35)
    report = calibration_report(scores, labels, t, 0.0)
    assert report["reject"]["escape_rate"] == 0.0
    assert report["reject"]["false_reject_rate"] == pytest.approx(1 / 3)  # the ok part at 0.75
    assert report["review_rate"] == 0.0
    assert rates_at(scores, np.array([1, 1, 1, 0, 0, 0]), 0.15)["false_reject_rate"] == pytest.approx(2 / 3)


def test_review_band_sized_by_the_good_parts_qa_can_look_at():
    rng = np.random.default_rng(3)
    ok = rng.uniform(0.0, 0.3, 1000)
    scores = np.concatenate([rng.uniform(0.5, 1.0, 200), ok])
    targets = np.array([1] * 200 + [0] * 1000)
    t = calibrate_threshold(scores, targets, 0.0, review_max_ok_rate=0.1)
    flagged_ok = (ok >= t.review).mean()
    assert flagged_ok <= 0.1 and flagged_ok >= 0.099  # as many good parts as allowed, not fewer
    assert t.review < t.reject == pytest.approx(scores[:200].min())
    tied = calibrate_threshold([0.9, 0.8, 0.2, 0.2, 0.2, 0.1], [1, 1, 0, 0, 0, 0], 0.0, review_max_ok_rate=0.5)
    assert tied.review > 0.2  # three good parts tie at 0.2: flagging them would exceed half of the four
    everything = calibrate_threshold([0.9, 0.1], [1, 0], 0.0, review_max_ok_rate=1.0)
    assert everything.review == 0.0
    capped = calibrate_threshold([0.3, 0.9, 0.95], [1, 0, 0], 0.0, review_max_ok_rate=0.0)
    assert capped.review == capped.reject == pytest.approx(0.3)  # never above the reject threshold
    with pytest.raises(DataError, match="no ok parts"):
        calibrate_threshold([0.9, 0.8], [1, 1], 0.0, review_max_ok_rate=0.1)


def test_review_rules_are_exclusive_in_the_config():
    from inspection.config import load_config
    from inspection.errors import ConfigError
    from inspection.train import TrainConfig

    with pytest.raises(ConfigError, match="set one of review_escape_rate"):
        load_config(TrainConfig, None, ["review_max_ok_rate=0.1"])  # review_escape_rate defaults to 0.0
    config = load_config(TrainConfig, None, ["review_max_ok_rate=0.1", "review_escape_rate=null"])
    assert config.review_max_ok_rate == 0.1


def test_no_defects_in_val_is_a_clear_error():
    with pytest.raises(DataError, match="no defect parts"):
        calibrate_threshold([0.1, 0.2, 0.3], ["ok", "ok", "ok"], 0.005)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": ["ok", "bad"]}, "not allowed"),
        ({"labels": [0, 2]}, "0 \\(ok\\) or 1"),
        ({"labels": ["ok"]}, "differ in length"),
        ({"target_escape_rate": 1.0}, "not allowed"),
        ({"review_escape_rate": 0.5}, "stricter"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {"scores": [0.2, 0.8], "labels": ["ok", "defect"], "target_escape_rate": 0.1} | kwargs
    with pytest.raises(DataError, match=match):
        calibrate_threshold(**args)


def test_nan_scores_rejected():
    with pytest.raises(DataError, match="NaN"):
        calibrate_threshold([float("nan"), 0.8], ["ok", "defect"], 0.0)
