"""ONNX export: one checked self-contained file, parity with PyTorch, metadata round trip, CAM heatmap, errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

from inspection.errors import ConfigError, DataError
from inspection.export import ExportConfig, export_net, export_onnx
from inspection.export.onnx_export import MODEL_FILE
from inspection.export.parity import torch_predict
from inspection.images import encode_png
from inspection.onnx_infer import OnnxModel
from inspection.schemas import ModelCard
from inspection.synth import render_part
from inspection.thresholds import verdicts_for


@pytest.fixture(scope="module")
def tiny_net(tiny_run: Path):
    from inspection.train import load_run

    torch.set_num_threads(2)
    return load_run(tiny_run).net


def _frames(seed: int) -> dict[str, np.ndarray]:
    """Synthetic castings at camera sizes the tracer never saw, as batches of 1 and 5."""
    rng = np.random.default_rng(seed)
    parts = [render_part(rng, defect=bool(i % 2))[0] for i in range(5)]  # (300, 300, 3)
    return {
        "300x300 batch 5": np.stack(parts),
        "300x240 batch 5": np.stack([p[:, 30:270] for p in parts]),  # H=300, W=240
        "257x311 batch 1": cv2.resize(parts[1], (311, 257), interpolation=cv2.INTER_AREA)[None],
        "240x320 grey batch 5": np.stack([np.repeat(cv2.resize(p, (320, 240))[..., :1], 3, axis=2) for p in parts]),
    }


def test_export_is_one_checked_file_with_the_contract_io(tiny_export: Path) -> None:
    model_path = tiny_export / MODEL_FILE
    assert sorted(p.name for p in tiny_export.glob("*.onnx*")) == [MODEL_FILE]  # no model.onnx.data
    for name in ("model_card.json", "metrics.json", "parity.json", "export.json", "export_config.yaml"):
        assert (tiny_export / name).is_file(), name
    assert (tiny_export / "plots").is_dir()
    onnx.checker.check_model(str(model_path), full_check=True)
    model = onnx.load(str(model_path))
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][3] == 3
    assert all(d.dim_param and not d.dim_value for d in dims[:3]), "N, H and W must be symbolic (dynamic)"
    outs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outs) == ["defect_prob", "heatmap"]
    assert all(t.elem_type == onnx.TensorProto.FLOAT for t in outs.values())
    assert [len(t.shape.dim) for t in outs.values()] == [1, 3]
    report = json.loads((tiny_export / "export.json").read_text())
    assert report["dynamic_size"] is True and report["parity"]["passed"] and report["parity"]["n_images"] > 0
    assert report["shape_parity"]["passed"]


def test_run_drift_reference_ships_with_the_export(tiny_run: Path, tmp_path: Path) -> None:
    from inspection.drift import REFERENCE_FILE, DriftMonitor, DriftReference
    from inspection.schemas import Thresholds
    from inspection.train.data import make_sample
    from inspection.train.trainer import write_run_drift_reference

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rows = json.loads((run / "samples.json").read_text())
    samples = [make_sample(r["path"], r["sha256"], r["label"], r["split"], r["group_id"]) for r in rows["val"]]
    scores = np.load(run / "val_scores.npy")
    thresholds = Thresholds(**json.loads((run / "model_card.json").read_text())["thresholds"])
    write_run_drift_reference(run, samples[:5], scores[:5], thresholds, "v")
    assert not (run / REFERENCE_FILE).exists()  # too few images for histograms: no reference rather than noise
    many = (samples * 3)[:30]
    write_run_drift_reference(run, many, np.tile(scores, 3)[:30], thresholds, "v")
    reference = DriftReference.load(run / REFERENCE_FILE)
    assert reference.n == 30 and reference.source == "v on its calibration photos"
    out = tmp_path / "export"
    export_onnx(ExportConfig(measure_latency=False), run, out)
    assert (out / REFERENCE_FILE).read_bytes() == (run / REFERENCE_FILE).read_bytes()
    assert DriftMonitor.for_model_dir(out).reference == reference  # the runner finds it next to the model


def test_onnx_reproduces_pytorch_on_synthetic_frames(tiny_net, tiny_export: Path, tiny_run: Path) -> None:
    model = OnnxModel(tiny_export / MODEL_FILE, providers=["CPUExecutionProvider"], threads=2)
    thresholds = model.thresholds
    for name, batch in _frames(seed=3).items():
        with torch.inference_mode():
            ref_p, ref_h = (t.numpy() for t in tiny_net(torch.from_numpy(batch)))
        got_p, got_h = model.predict(batch)
        assert got_p.shape == (len(batch),) and got_p.dtype == np.float32, name
        assert got_h.shape == ref_h.shape and got_h.ndim == 3 and got_h.shape[0] == len(batch), name
        assert np.abs(got_p - ref_p).max() <= 1e-4, name
        assert (verdicts_for(got_p, thresholds) == verdicts_for(ref_p, thresholds)).all(), name
        assert np.abs(got_h - ref_h).max() <= 1e-3, name
        assert got_h.min() >= 0.0 and got_h.max() <= 1.0, name
    grey = _frames(seed=3)["240x320 grey batch 5"]
    p1, h1 = model.predict(grey[..., :1])  # a grey camera's single channel is replicated like decode_image does
    p3, h3 = model.predict(grey)
    np.testing.assert_array_equal(p1, p3)
    np.testing.assert_array_equal(h1, h3)


def test_batch_composition_does_not_change_a_score(tiny_export: Path) -> None:
    model = OnnxModel(tiny_export / MODEL_FILE, providers=["CPUExecutionProvider"], threads=2)
    batch = _frames(seed=4)["300x240 batch 5"]
    p5, h5 = model.predict(batch)
    for i in (0, 4):
        p1, h1 = model.predict(batch[i : i + 1])
        assert abs(float(p1[0]) - float(p5[i])) <= 1e-5
        assert np.abs(h1[0] - h5[i]).max() <= 1e-5


def test_model_card_round_trips_through_the_onnx_metadata(tiny_export: Path, tiny_run: Path, tmp_path: Path) -> None:
    run_card = ModelCard.model_validate_json((tiny_run / "model_card.json").read_text())
    model = onnx.load(str(tiny_export / MODEL_FILE))
    meta = {p.key: p.value for p in model.metadata_props}
    embedded = ModelCard.model_validate_json(meta["model_card"])
    assert embedded == run_card.model_copy(update={"files": {}})
    for key in ("version", "class_names", "thresholds", "preprocess", "data_fingerprint", "metrics", "created_at"):
        assert getattr(embedded, key) == getattr(run_card, key), key
    assert embedded.metrics and embedded.class_names == ["ok", "defect"]
    assert meta["version"] == run_card.version and meta["precision"] == "fp32" and meta["exported_at"]
    assert float(meta["threshold_reject"]) == run_card.thresholds.reject
    # the card beside the model lists the model's sha256
    side = ModelCard.model_validate_json((tiny_export / "model_card.json").read_text())
    assert side.model_copy(update={"files": {}}) == embedded
    loaded = OnnxModel(tiny_export / MODEL_FILE, providers=["CPUExecutionProvider"])
    assert side.files == {MODEL_FILE: loaded.sha256}
    assert loaded.card == side and loaded.version == run_card.version and loaded.thresholds == run_card.thresholds
    # alone, without its sidecar card, the model still says what it is
    alone = tmp_path / "alone.onnx"
    shutil.copy2(tiny_export / MODEL_FILE, alone)
    bare = OnnxModel(alone, providers=["CPUExecutionProvider"])
    assert bare.card == embedded and bare.version == run_card.version and bare.thresholds == run_card.thresholds


# -- heatmap on a planted defect ---------------------------------------------------------------------------------

FRAME = 160  # camera frame side; the graph resizes it to the net's 128 -> a 4x4 heatmap


def _blob_frame(rng: np.random.Generator, at: tuple[int, int] | None) -> np.ndarray:
    """A grey noisy plate, with a bright disc of radius 12 centred at `at` (y, x) when given."""
    img = rng.normal(110, 12, (FRAME, FRAME)).clip(0, 255)
    if at is not None:
        yy, xx = np.mgrid[0:FRAME, 0:FRAME]
        img[(yy - at[0]) ** 2 + (xx - at[1]) ** 2 < 12**2] = 250
    return np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)


@dataclass
class _Sample:
    path: Path
    label: str | None


def test_heatmap_peaks_where_the_defect_is_planted(tiny_run: Path, tmp_path: Path) -> None:
    """A blob detector by construction: the head points along (pooled features with a blob - without). The CAM
    then scores each cell by how blob-like it is, so the exported heatmap must peak in the blob's quadrant."""
    from inspection.models import build_net

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_net("test_efficientnet", pretrained=False, input_size=128).eval()
    plain = np.stack([_blob_frame(rng, None) for _ in range(32)])
    blobs = np.stack([_blob_frame(rng, tuple(rng.integers(16, FRAME - 16, 2))) for _ in range(32)])
    with torch.inference_mode():
        f_plain = net.pooled_features(torch.from_numpy(plain)).mean(0)
        f_blob = net.pooled_features(torch.from_numpy(blobs)).mean(0)
    direction = f_blob - f_plain
    with torch.no_grad():
        net.head.weight.copy_(8 * direction[None] / direction.norm() ** 2)
        net.head.bias.fill_(float(-(net.head.weight[0] @ (f_blob + f_plain) / 2)))

    val = []
    for i, img in enumerate([*plain[:3], *blobs[:3]]):
        path = tmp_path / f"val{i}.png"
        path.write_bytes(encode_png(img))
        val.append(_Sample(path, "defect" if i >= 3 else "ok"))
    card = ModelCard.model_validate_json((tiny_run / "model_card.json").read_text())
    card = card.model_copy(update={"preprocess": net.preprocess.config.to_dict()})
    result = export_net(ExportConfig(), net, card, tmp_path / "export", val=val)
    model = OnnxModel(result.model_path, providers=["CPUExecutionProvider"])

    positions = [(40, 40), (40, 120), (120, 40), (120, 120), (28, 100), (100, 28), (132, 90), (86, 134)]
    probs, heat = model.predict(np.stack([_blob_frame(rng, p) for p in positions]))
    p_plain, h_plain = model.predict(np.stack([_blob_frame(rng, None) for _ in range(4)]))
    assert heat.shape == (len(positions), 4, 4)
    for (y, x), h in zip(positions, heat, strict=True):
        iy, ix = np.unravel_index(int(h.argmax()), h.shape)
        assert (iy < 2, ix < 2) == (y < FRAME / 2, x < FRAME / 2), f"blob at {(y, x)}, heatmap peak at cell {(iy, ix)}"
    assert probs.mean() > 0.5 > p_plain.mean()  # the score sees the blob too
    assert np.median(heat.max(axis=(1, 2))) > h_plain.max()


# -- errors ------------------------------------------------------------------------------------------------------


def test_export_of_a_missing_or_incomplete_run_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run directory not found"):
        export_onnx(ExportConfig(), tmp_path / "nope", tmp_path / "out")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text("backbone: test_efficientnet\n")
    with pytest.raises(DataError, match="not a complete run directory"):
        export_onnx(ExportConfig(), empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_and_keeps_it(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_onnx(ExportConfig(), tiny_run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_export_writes_the_model_folder(tiny_run: Path, tmp_path: Path, capsys) -> None:
    from inspection.cli import main

    out = tmp_path / "cli_export"
    assert (
        main(["export", str(tiny_run), "parity_batch_size=8", "--out", str(out), "--set", "measure_latency=false"]) == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["parity"]["passed"] and printed["int8"] is None
    assert "parity_batch_size: 8" in (out / "export_config.yaml").read_text()
    assert (out / MODEL_FILE).is_file() and (out / "model_card.json").is_file() and (out / "metrics.json").is_file()
    card = ModelCard.model_validate_json((out / "model_card.json").read_text())
    assert card.files == printed["files"] and list(card.files) == [MODEL_FILE]
    assert main(["export", str(tiny_run), "--out", str(out)]) == 1  # second time: folder not empty -> error
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "not_an_override", "--out", str(tmp_path / "x")]) == 1
    assert "expected RUN_DIR then key=value overrides" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_parity_failure_stops_the_export(tiny_net, tiny_run: Path, tmp_path: Path, monkeypatch) -> None:
    """If ONNX scored differently from PyTorch the export must fail and leave nothing behind."""
    import inspection.export.parity as parity
    from inspection.export import ExportCheckError
    from inspection.train import load_run

    real = parity.OnnxModel.predict_images

    def skewed(self, images, batch_size=16):
        probs, heat = real(self, images, batch_size)
        return probs + 1e-3, heat  # a small shift: what a preprocessing mismatch looks like

    monkeypatch.setattr(parity.OnnxModel, "predict_images", skewed)
    run = load_run(tiny_run)
    out = tmp_path / "bad"
    with pytest.raises(ExportCheckError, match="does not reproduce PyTorch"):
        export_net(ExportConfig(), tiny_net, run.card, out, val=run.samples["val"][:4])
    assert not out.exists() and not list(tmp_path.glob(".bad.tmp-*"))


# -- thresholds calibrated on a validation score -----------------------------------------------------------------


def test_tie_resolution_moves_a_threshold_off_a_score_and_keeps_every_verdict() -> None:
    from inspection.export.parity import resolve_threshold_ties
    from inspection.schemas import Thresholds

    ref = np.array([0.1, 0.2, 0.3, 0.5, 0.9], np.float32)
    got = ref.copy()
    got[2] = np.nextafter(ref[2], np.float32(0))  # ONNX one ulp lower on the image the threshold sits on
    tied = Thresholds(reject=float(ref[3]), review=float(ref[2]))
    assert not (verdicts_for(ref, tied) == verdicts_for(got, tied)).all()
    new, notes = resolve_threshold_ties(ref, got, tied)
    assert new.reject == tied.reject and 0.2 < new.review < float(got[2])
    assert len(notes) == 1 and notes[0].startswith("review threshold")
    assert (verdicts_for(ref, new) == verdicts_for(ref, tied)).all()
    assert (verdicts_for(got, new) == verdicts_for(ref, tied)).all()
    # no tie: nothing moves
    assert resolve_threshold_ties(ref, ref, Thresholds(reject=0.5, review=0.3)) == (
        Thresholds(reject=0.5, review=0.3),
        [],
    )
    # ONNX orders two images differently across the threshold: no threshold can fix that
    swapped = ref.copy()
    swapped[1], swapped[2] = ref[2], ref[1]
    assert resolve_threshold_ties(ref, swapped, Thresholds(reject=0.9, review=0.3)) is None


def test_export_survives_a_threshold_calibrated_on_a_validation_score(tiny_net, tiny_export: Path, tiny_run, tmp_path):
    """The trainer puts each threshold on a validation defect's score; ONNX may score that image an ulp lower.
    The export must then move the threshold into the empty gap (and say so) instead of failing or flipping it."""
    from inspection.images import read_image
    from inspection.schemas import Thresholds
    from inspection.train import load_run

    run = load_run(tiny_run)
    val = run.samples["val"]
    images = [read_image(s.path) for s in val]
    ref, _ = torch_predict(tiny_net, images)
    got, _ = OnnxModel(tiny_export / MODEL_FILE, providers=["CPUExecutionProvider"]).predict_images(images)
    i = int(np.argmax(np.abs(ref.astype(np.float64) - got)))
    assert ref[i] != got[i], "the engines agree to the last bit on every image: no tie can be built"
    t = float(max(ref[i], got[i]))  # exactly one engine reaches the threshold: a tie decided by rounding
    tied = Thresholds(reject=t, review=t)
    assert not (verdicts_for(ref, tied) == verdicts_for(got, tied)).all()
    card = run.card.model_copy(update={"thresholds": tied})
    result = export_net(ExportConfig(measure_latency=False), tiny_net, card, tmp_path / "out", val=val)
    new = result.card.thresholds
    assert result.parity.passed and result.parity.verdict_agreement == 1.0
    assert new.reject != t and new.review == new.reject
    assert (verdicts_for(ref, new) == verdicts_for(ref, tied)).all()  # PyTorch's verdicts are unchanged
    assert any("sat on a validation score" in n for n in result.notes) and "sat on" in result.card.notes
    assert OnnxModel(result.model_path).thresholds == new
    meta = {p.key: p.value for p in onnx.load(str(result.model_path)).metadata_props}
    assert ModelCard.model_validate_json(meta["model_card"]).thresholds == new


def test_export_writes_the_smoke_reference_the_runner_checks(tiny_export: Path):
    import json

    from inspection.onnx_infer import OnnxModel
    from inspection.runner.inferencer import REFERENCE_FILE, smoke_reference

    card = json.loads((tiny_export / "model_card.json").read_text())
    refs = json.loads((tiny_export / REFERENCE_FILE).read_text())
    assert list(refs) == [MODEL_FILE]  # FP32 only: other precisions differ across devices
    again = smoke_reference(OnnxModel(tiny_export / MODEL_FILE), card["preprocess"]["input_size"])
    assert np.allclose(refs[MODEL_FILE]["scores"], again["scores"], atol=1e-6)
