"""INT8: the accuracy gate on known arrays, and the export keeping or dropping INT8 for a model of known scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from inspection.export import ExportConfig, export_net
from inspection.export.onnx_export import INT8_FILE, MODEL_FILE
from inspection.export.parity import torch_predict
from inspection.export.quantize import head_conv_nodes, int8_gate
from inspection.images import read_image
from inspection.schemas import ModelCard, Thresholds
from tests.fixtures.model import known_card

T = Thresholds(reject=0.5, review=0.3)


def test_gate_keeps_identical_verdicts_and_counts_changes() -> None:
    p32 = np.linspace(0.0, 1.0, 1000, dtype=np.float32)
    p8 = p32 + np.float32(0.001) * np.sign(np.sin(np.arange(1000)))  # small noise, away from the thresholds
    p8[[299, 300, 499, 500]] = p32[[299, 300, 499, 500]]  # the noise would flip exactly these: keep them
    labels = ["defect" if p > 0.4 else "ok" for p in p32]
    kept, reason, figures = int8_gate(p32, p8, labels, T, 0.999)
    assert kept and "INT8 kept" in reason
    assert figures["verdict_agreement"] == 1.0 and figures["n_verdict_changes"] == 0 and figures["new_escapes"] == 0
    assert figures["max_prob_diff"] == pytest.approx(0.001, abs=1e-6)


def test_gate_agreement_limit_is_inclusive() -> None:
    p32 = np.full(1000, 0.9, dtype=np.float32)  # all reject
    labels = ["ok"] * 1000
    p8 = p32.copy()
    p8[0] = 0.4  # one reject -> review on an ok part: 99.9 % agreement, allowed
    kept, _, figures = int8_gate(p32, p8, labels, T, 0.999)
    assert kept and figures["n_verdict_changes"] == 1 and figures["verdict_agreement"] == pytest.approx(0.999)
    p8[1] = 0.4  # a second change: 99.8 % < 99.9 %
    kept, reason, figures = int8_gate(p32, p8, labels, T, 0.999)
    assert not kept and figures["n_verdict_changes"] == 2
    assert "FP32 kept" in reason and "99.8000%" in reason and "99.90%" in reason


def test_gate_refuses_a_single_new_escape_even_with_high_agreement() -> None:
    p32 = np.full(2000, 0.35, dtype=np.float32)  # all review
    labels = ["defect"] * 2000
    p8 = p32.copy()
    p8[7] = 0.29  # one held defect now passes
    kept, reason, figures = int8_gate(p32, p8, labels, T, 0.999)
    assert figures["verdict_agreement"] >= 0.999 and figures["new_escapes"] == 1
    assert not kept and "1 defect(s) that FP32 held would pass with INT8" in reason
    # the same change on an ok part is a verdict change, not an escape
    kept, _, figures = int8_gate(p32, p8, ["ok"] * 2000, T, 0.999)
    assert kept and figures["new_escapes"] == 0


def test_gate_refuses_when_there_is_nothing_to_check() -> None:
    kept, reason, _ = int8_gate(np.zeros(0, np.float32), np.zeros(0, np.float32), [], T, 0.999)
    assert not kept and "no validation images" in reason


@pytest.fixture(scope="module")
def known_val(known_net, known_parts):
    """Validation images of the known model (10 defect, 10 ok) and their FP32 PyTorch scores (0.953 / 0.047)."""
    torch.set_num_threads(2)
    val = known_parts[::4]
    probs, _ = torch_predict(known_net, [read_image(s.path) for s in val])
    return val, probs


def test_export_drops_int8_that_drifts_and_says_why(known_net, known_parts, known_val, tmp_path: Path) -> None:
    """Calibrated on black frames, the activation ranges are useless on real parts: INT8 moves the known model's
    logits by several times their distance from the middle threshold, so verdicts flip and FP32 alone is kept."""
    val, probs = known_val
    middle = float((probs.min() + probs.max()) / 2)  # half-way between the ok and the defect scores
    card = known_card(known_net, known_parts, thresholds=Thresholds(reject=middle, review=middle))
    black = [np.zeros((300, 300, 3), np.uint8)] * 4
    config = ExportConfig(int8=True, measure_latency=False, calibration_batch_size=4)
    result = export_net(config, known_net, card, tmp_path / "out", val=val, calibration_override=black)

    report = result.int8
    assert report is not None and not report.kept and report.n_calibration == 4
    assert report.verdict_agreement < 0.999 and report.n_verdict_changes > 0 and report.max_prob_diff > 0
    assert report.reason.startswith("INT8 dropped, FP32 kept") and "agree with FP32" in report.reason
    assert report.reason in result.notes
    assert result.int8_path is None and not (tmp_path / "out" / INT8_FILE).exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.onnx")) == [MODEL_FILE]
    card_files = ModelCard.model_validate_json((tmp_path / "out" / "model_card.json").read_text()).files
    assert list(card_files) == [MODEL_FILE]
    written = json.loads((tmp_path / "out" / "export.json").read_text())
    assert written["int8"]["kept"] is False and written["int8_path"] is None


def test_export_keeps_int8_calibrated_on_the_runs_images(known_net, known_parts, known_val, tmp_path: Path) -> None:
    """Calibrated on the model's own training images and with thresholds in the widest gap between validation
    scores, the INT8 model must agree with FP32 and be kept as a QDQ model with its card and hash.

    The known model's validation scores sit in two clusters 0.9 apart (logits -3 / +3); INT8 moves a logit by
    about 0.5 (std) on this backbone, so a verdict would flip only at a drift of 6 standard deviations."""
    val, probs = known_val
    s = np.sort(probs.astype(np.float64))
    i = int(np.argmax(np.diff(s)))
    gap_mid = float((s[i] + s[i + 1]) / 2)
    card = known_card(known_net, known_parts, thresholds=Thresholds(reject=gap_mid, review=gap_mid))
    config = ExportConfig(int8=True, measure_latency=True, latency_repeats=2, latency_batch_sizes=(1, 4))
    result = export_net(config, known_net, card, tmp_path / "out", val=val, train=known_parts)

    report = result.int8
    assert report is not None, result.notes
    assert s[i + 1] - s[i] > 0.8, f"the known model's scores are not in two clusters: {s}"
    assert report.max_prob_diff < (s[i + 1] - s[i]) / 2 or not report.kept  # consistency of the figures
    assert report.kept, f"{report.reason} (widest gap {s[i + 1] - s[i]:.3g}, max drift {report.max_prob_diff:.3g})"
    assert report.verdict_agreement == 1.0 and report.new_escapes == 0
    assert set(report.latency_ms_per_image) == {"fp32", "int8"} and set(report.speedup) == {"1", "4"}
    int8_path = tmp_path / "out" / INT8_FILE
    assert result.int8_path == int8_path and int8_path.is_file()
    model = onnx.load(str(int8_path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["precision"] == "int8" and ModelCard.model_validate_json(meta["model_card"]).version == card.version
    from inspection.onnx_infer import OnnxModel

    loaded = OnnxModel(int8_path, providers=["CPUExecutionProvider"])  # verified against the sidecar card's hash
    assert loaded.card.files == result.files and set(result.files) == {MODEL_FILE, INT8_FILE}


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_quantize_accepts_a_short_last_batch(known_export: Path, tmp_path: Path, method: str) -> None:
    """5 images in batches of 2: the histogram calibrators used to fail on the ragged last batch."""
    from inspection.export.quantize import quantize_int8
    from inspection.onnx_infer import OnnxModel

    rng = np.random.default_rng(0)
    calib = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(5)]
    out = quantize_int8(known_export / MODEL_FILE, tmp_path / "q.onnx", calib, batch_size=2, method=method)
    probs, heat = OnnxModel(out, providers=["CPUExecutionProvider"]).predict(np.stack(calib[:2]))
    assert probs.shape == (2,) and heat.ndim == 3 and np.isfinite(probs).all()
    # the CAM head (one 1x1 Conv with one output channel) stays float: its weight is not a DequantizeLinear output
    heads = head_conv_nodes(known_export / MODEL_FILE)
    assert len(heads) == 1
    quantized = onnx.load(str(out)).graph
    dq_outputs = {o for n in quantized.node if n.op_type == "DequantizeLinear" for o in n.output}
    (head,) = [n for n in quantized.node if n.name == heads[0]]
    assert head.input[1] not in dq_outputs and any(
        n.input[1] in dq_outputs for n in quantized.node if n.op_type == "Conv"
    )
    with pytest.raises(ValueError, match="not allowed"):
        quantize_int8(known_export / MODEL_FILE, tmp_path / "r.onnx", calib, method="kmeans")
