"""Torch-free inference: integrity checks, refusal of broken files, input checks, providers, thread options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from inspection.errors import ConfigError, IntegrityError
from inspection.onnx_infer import OnnxModel, _smoke_model_bytes, select_providers, sha256_file

CPU = ["CPUExecutionProvider"]


@pytest.fixture
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    return out


def test_garbage_and_truncated_files_are_refused_clearly(tiny_export: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ConfigError, match="is not a loadable ONNX model"):
        OnnxModel(garbage, providers=CPU)
    data = (tiny_export / "model.onnx").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated.onnx is not a loadable ONNX model"):
        OnnxModel(truncated, providers=CPU)
    with pytest.raises(ConfigError, match="model file not found"):
        OnnxModel(tmp_path / "missing.onnx", providers=CPU)


def test_a_model_changed_after_export_is_refused(export_copy: Path) -> None:
    path = export_copy / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(IntegrityError, match="model_card.json expects"):
        OnnxModel(path, providers=CPU)


def test_expected_sha256_is_checked(tiny_export: Path) -> None:
    path = tiny_export / "model.onnx"
    with pytest.raises(IntegrityError, match="the caller expects 0000"):
        OnnxModel(path, providers=CPU, expected_sha256="0" * 64)
    model = OnnxModel(path, providers=CPU, expected_sha256=sha256_file(path).upper())
    assert model.sha256 == sha256_file(path)


def test_unreadable_sidecar_card_is_refused(export_copy: Path) -> None:
    (export_copy / "model_card.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="cannot be read as JSON"):
        OnnxModel(export_copy / "model.onnx", providers=CPU)


def test_a_model_without_the_contract_io_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(_smoke_model_bytes())  # input `images` but only one output
    with pytest.raises(ConfigError, match="outputs \\['defect_prob'\\]; an inspection model has"):
        OnnxModel(other, providers=CPU)


def test_predict_checks_its_input(tiny_export: Path) -> None:
    model = OnnxModel(tiny_export / "model.onnx", providers=CPU)
    with pytest.raises(ValueError, match="must be uint8"):
        model.predict(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="got \\(64, 64, 3\\)"):
        model.predict(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="N >= 1"):
        model.predict(np.zeros((0, 64, 64, 3), np.uint8))
    rgba = np.zeros((1, 64, 64, 4), np.uint8)
    with pytest.raises(ValueError, match="\\(N, H, W, 3\\)"):
        model.predict(rgba)


def test_predict_images_batches_mixed_sizes_like_single_calls(tiny_export: Path) -> None:
    model = OnnxModel(tiny_export / "model.onnx", providers=CPU, threads=1)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(96, 128, 3), (80, 80, 3), (96, 128, 3)]]
    probs, heat = model.predict_images(images, batch_size=2)
    for img, p, h in zip(images, probs, heat, strict=True):
        p1, h1 = model.predict(img[None])
        assert abs(float(p1[0]) - float(p)) <= 1e-5 and np.abs(h1[0] - h).max() <= 1e-5


def test_spinning_can_be_disabled_without_changing_results(tiny_export: Path) -> None:
    batch = np.random.default_rng(2).integers(0, 256, (2, 100, 120, 3), dtype=np.uint8)
    spin = OnnxModel(tiny_export / "model.onnx", providers=CPU, threads=2)
    calm = OnnxModel(tiny_export / "model.onnx", providers=CPU, threads=2, allow_spinning=False)
    assert spin.allow_spinning and not calm.allow_spinning
    entries = calm.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert entries == "0"
    np.testing.assert_array_equal(spin.predict(batch)[0], calm.predict(batch)[0])
    within = OnnxModel(tiny_export / "model.onnx", providers=CPU, threads=2, spin_between_runs=False)
    options = within.session.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # spinning stays on within a run
        options.get_session_config_entry("session.intra_op.allow_spinning")
    np.testing.assert_array_equal(spin.predict(batch)[0], within.predict(batch)[0])
    assert spin.busy_session is None
    both = OnnxModel(tiny_export / "model.onnx", providers=CPU, threads=2, busy_threads=1)
    busy_options = both.busy_session.get_session_options()
    assert busy_options.intra_op_num_threads == 1
    assert busy_options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    np.testing.assert_allclose(both.predict(batch, busy=True)[0], spin.predict(batch)[0], atol=1e-6)


def test_select_providers_always_ends_with_cpu() -> None:
    providers = select_providers()
    assert providers[-1] == "CPUExecutionProvider" and len(set(providers)) == len(providers)
    assert select_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_card_with_a_model_not_listed_falls_back_to_the_embedded_card(export_copy: Path) -> None:
    card = json.loads((export_copy / "model_card.json").read_text())
    card["files"] = {"something_else.onnx": "0" * 64}
    (export_copy / "model_card.json").write_text(json.dumps(card))
    model = OnnxModel(export_copy / "model.onnx", providers=CPU)
    assert model.card == model.embedded_card and model.card.files == {}
