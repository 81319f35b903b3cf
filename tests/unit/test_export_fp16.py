"""`--fp16`: the float16 model for GPU providers keeps the contract (uint8 in, float32 out) and the scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest


def test_fp16_model_keeps_the_contract_and_the_scores(tiny_run: Path, tmp_path: Path) -> None:
    from inspection.export import ExportConfig, export_onnx
    from inspection.onnx_infer import OnnxModel

    result = export_onnx(ExportConfig(fp16=True, measure_latency=False), tiny_run, tmp_path / "out")
    assert result.fp16_path is not None and result.fp16_path.is_file()
    model = onnx.load(str(result.fp16_path))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer), (
        "no float16 weights: the conversion did nothing"
    )
    assert result.files.get(result.fp16_path.name), "the fp16 file must carry a sha256 in the card"
    frames = np.random.default_rng(0).integers(0, 255, (4, 300, 300, 3), dtype=np.uint8)
    p32, _ = OnnxModel(result.model_path, providers=["CPUExecutionProvider"]).predict(frames)
    try:
        fp16 = OnnxModel(result.fp16_path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # pragma: no cover - depends on the CPU kernels of this onnxruntime build
        pytest.fail(f"the fp16 model does not load on the CPU provider: {exc}")
    p16, _ = fp16.predict(frames)
    assert np.max(np.abs(p16 - p32)) < 1e-2
