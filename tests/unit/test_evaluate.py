"""Evaluation as QA sees it: metrics on known scores, the line view with a review band, and `inspection evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from inspection.errors import DataError
from inspection.schemas import Thresholds
from inspection.train import evaluate_scores
from inspection.train.evaluate import line_report


def test_metrics_on_known_scores():
    # defects: 0.9, 0.8 caught; 0.3 escapes. ok: 0.1, 0.2 pass; 0.6 is falsely rejected
    scores = [0.9, 0.8, 0.3, 0.1, 0.2, 0.6]
    labels = ["defect", "defect", "defect", "ok", "ok", "ok"]
    m = evaluate_scores(scores, labels, Thresholds(reject=0.5, review=0.25))
    assert m.confusion == [[2, 1], [1, 2]]
    assert m.n == 6
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.defect_recall == pytest.approx(2 / 3)
    assert m.escape_rate == pytest.approx(1 / 3)
    assert m.false_reject_rate == pytest.approx(1 / 3)
    assert m.precision == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 / 3)
    # ranks: defects 0.9 0.8 0.3 vs ok 0.1 0.2 0.6: 8 of 9 pairs ordered correctly
    assert m.roc_auc == pytest.approx(8 / 9)
    assert 0 < m.pr_auc <= 1


def test_threshold_is_inclusive_like_the_verdict_rule():
    m = evaluate_scores([0.5, 0.49], [1, 0], 0.5)
    assert m.confusion == [[1, 0], [0, 1]]


def test_one_class_only_has_defined_rates_and_no_auc():
    m = evaluate_scores([0.1, 0.7], ["ok", "ok"], 0.5)
    assert m.defect_recall == 1.0 and m.escape_rate == 0.0
    assert m.false_reject_rate == 0.5
    assert m.roc_auc is None and m.pr_auc is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.model_dump().values())


def test_empty_and_mismatched_inputs():
    with pytest.raises(DataError, match="nothing to evaluate"):
        evaluate_scores([], [], 0.5)
    with pytest.raises(DataError, match="differ in length"):
        evaluate_scores([0.1, 0.2], [1], 0.5)


def test_line_report_counts_review_band():
    scores = np.array([0.9, 0.4, 0.1, 0.3, 0.05, 0.7])
    labels = np.array([1, 1, 1, 0, 0, 0])
    line = line_report(scores, labels, Thresholds(reject=0.6, review=0.25))
    assert line["reject_rate"] == pytest.approx(2 / 6)
    assert line["review_rate"] == pytest.approx(2 / 6)  # 0.4 (defect) and 0.3 (ok)
    assert line["escapes"] == 1  # the defect at 0.1 passes unseen
    assert line["line_escape_rate"] == pytest.approx(1 / 3)
    assert line["ok_reviewed_rate"] == pytest.approx(1 / 3)


def test_run_evaluate_matches_the_card(tiny_run: Path, tmp_path: Path):
    from inspection.train import load_run, run_evaluate

    card = load_run(tiny_run).card
    result = run_evaluate(tiny_run, split="test", out=tmp_path / "eval")
    # training wrote test metrics through another code path (scores computed in the trainer): they must agree
    assert result.metrics.confusion == card.metrics["test"].confusion
    assert result.metrics.accuracy == pytest.approx(card.metrics["test"].accuracy)
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["metrics"]["confusion"] == card.metrics["test"].confusion
    names = {p.name for p in result.plots}
    assert {"roc.png", "pr.png", "confusion.png", "score_hist.png", "worst_mistakes.png"} <= names
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in result.plots)


def test_evaluate_cli_prints_json(tiny_run: Path, tmp_path: Path, capsys):
    from inspection.cli import main

    rc = main(["evaluate", str(tiny_run), "--split", "val", "--out", str(tmp_path / "e"), "--no-plots"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "val"
    assert set(out["metrics"]) >= {"accuracy", "defect_recall", "escape_rate", "false_reject_rate", "confusion"}


def test_evaluate_cli_bad_run_dir(tmp_path: Path, capsys):
    from inspection.cli import main

    assert main(["evaluate", str(tmp_path)]) == 1
    assert "not a complete run directory" in capsys.readouterr().err
