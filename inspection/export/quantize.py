"""INT8 (static QDQ, per-channel) and FP16 variants of an exported model, and the gate that decides INT8.

Only the CNN's Conv/Clip/Add nodes are quantized (U8 activations, S8 per-channel weights): the uint8 input, the
resize and normalisation before them, and the CAM head (a 1x1 Conv with one output channel) and sigmoid after them
stay float, so the score's last steps are exact. The ranges come from real training images of the run (INT8
drifts badly when calibrated on unrelated pictures), and the result is kept only when, on the validation images,
its verdicts agree with FP32's on at least `int8_min_agreement` of them and no defect that FP32 held (review or
reject) passes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspection.onnx_infer import INPUT_NAME, OnnxModel
from inspection.schemas import Thresholds, Verdict
from inspection.thresholds import verdicts_for

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ["Conv", "Clip", "Add"]  # the backbone; the CAM head (see head_conv_nodes) stays float


def head_conv_nodes(model_path: str | Path) -> list[str]:
    """Names of the Conv nodes with a single output channel: the defect head as a CAM. The backbone has none."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Conv" and len(n.input) > 1 and weights.get(n.input[1], [0])[:1] == [1]
    ]


@dataclass(frozen=True)
class Int8Report:
    kept: bool
    reason: str  # why it was kept or dropped, in words
    n_val: int
    verdict_agreement: float
    n_verdict_changes: int
    new_escapes: int  # defect-labelled images FP32 held (review/reject) that INT8 passes
    max_prob_diff: float
    min_agreement: float
    n_calibration: int
    latency_ms_per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> batch -> ms
    speedup: dict[str, float] = field(default_factory=dict)  # batch -> FP32 ms / INT8 ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 images, batched by equal shape."""

    def __init__(self, images: Sequence[np.ndarray], batch_size: int):
        by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
        for img in images:
            by_shape.setdefault(img.shape, []).append(img)
        batches = [
            np.stack(group[i : i + batch_size]) for group in by_shape.values() for i in range(0, len(group), batch_size)
        ]
        self._it = iter([{INPUT_NAME: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - only the entropy/percentile calibrators ask for it
        raise NotImplementedError


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration_images: Sequence[np.ndarray],
    batch_size: int = 8,
    method: str = "minmax",
) -> Path:
    """Static QDQ quantization of the backbone, calibrated on `calibration_images` (uint8 (H, W, 3))."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_images:
        raise ValueError("INT8 calibration needs at least one image")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method {method!r} is not allowed; allowed: {sorted(methods)}")
    if method != "minmax":
        # the histogram calibrators stack every batch's activations into one array: a short last batch makes it
        # ragged and onnxruntime fails ("inhomogeneous shape"); batches of one image are always equal
        batch_size = 1
    out_path = Path(out_path)

    class Reader(_Calibration, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="quant-", dir=out_path.parent) as tmp:
        src = Path(tmp) / "pre.onnx"
        try:
            # shape inference + graph clean-up, as onnxruntime recommends before quantizing
            quant_pre_process(str(fp32_path), str(src))
        except Exception as exc:  # noqa: BLE001 - the raw graph quantizes too, only less well
            logger.warning("quantization pre-processing failed (%s); quantizing the raw graph", exc)
            src = Path(fp32_path)
        t0 = time.perf_counter()
        quantize_static(
            str(src),
            str(out_path),
            Reader(calibration_images, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=QUANTIZED_OPS,
            nodes_to_exclude=head_conv_nodes(src),
            calibrate_method=methods[method],
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    logger.info(
        "quantized %s -> %s on %d calibration images in %.1f s",
        fp32_path,
        out_path,
        len(calibration_images),
        time.perf_counter() - t0,
    )
    return out_path


def int8_gate(
    fp32_probs: np.ndarray,
    int8_probs: np.ndarray,
    labels: Sequence[str | None],
    thresholds: Thresholds,
    min_agreement: float,
) -> tuple[bool, str, dict[str, Any]]:
    """Keep INT8 only if its verdicts agree with FP32's often enough and it lets no held defect through."""
    v32 = verdicts_for(fp32_probs, thresholds)
    v8 = verdicts_for(int8_probs, thresholds)
    n = len(v32)
    same = v32 == v8
    agreement = float(same.mean()) if n else 0.0
    is_defect = np.array([lbl == "defect" for lbl in labels], dtype=bool)
    new_escapes = int(np.sum(is_defect & (v32 != Verdict.pass_.value) & (v8 == Verdict.pass_.value)))
    figures = {
        "n_val": n,
        "verdict_agreement": agreement,
        "n_verdict_changes": int(n - same.sum()),
        "new_escapes": new_escapes,
        "max_prob_diff": float(np.abs(fp32_probs.astype(np.float64) - int8_probs).max()) if n else 0.0,
    }
    if n == 0:
        return False, "no validation images to check INT8 against FP32", figures
    reasons = []
    if agreement < min_agreement:
        reasons.append(
            f"verdicts agree with FP32 on {agreement:.4%} of {n} validation images (< {min_agreement:.2%} required)"
        )
    if new_escapes:
        reasons.append(f"{new_escapes} defect(s) that FP32 held would pass with INT8")
    if reasons:
        return False, "INT8 dropped, FP32 kept: " + "; ".join(reasons), figures
    return True, f"INT8 kept: verdicts agree on {agreement:.4%} of {n} validation images, no new escapes", figures


def measure_latency(
    path: str | Path,
    image: np.ndarray,
    batch_sizes: Sequence[int],
    threads: int = 2,
    repeats: int = 10,
    allow_spinning: bool = True,
) -> dict[str, float]:
    """Median milliseconds per image at each batch size (onnxruntime CPU, `threads` intra-op threads)."""
    model = OnnxModel(path, providers=["CPUExecutionProvider"], threads=threads, allow_spinning=allow_spinning)
    out = {}
    for bs in batch_sizes:
        batch = np.ascontiguousarray(np.broadcast_to(image, (bs, *image.shape)))
        model.predict(batch)  # warm-up: first run allocates and picks kernels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict(batch)
            times.append(time.perf_counter() - t0)
        out[str(bs)] = round(1000.0 * float(np.median(times)) / bs, 3)
    return out


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Float16 weights and activations for GPUs; input stays uint8 and outputs float32 (the file contract)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    # Resize on fp16 is unsupported on some providers and costs nothing to keep float: block it.
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=["Resize"])
    _toposort(half.graph)  # the converter appends its Cast nodes at the end, which the checker refuses
    onnx.save(half, str(out_path))
    return Path(out_path)


def _toposort(graph) -> None:
    """Reorder `graph.node` so every node comes after the producers of its inputs (Kahn's algorithm)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            names = [n.name for n in rest[:5]]
            raise ValueError(f"graph has a cycle or dangling inputs at nodes {names}")
        pending = rest
    nodes = [type(n)() for n in ordered]
    for copy, node in zip(nodes, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(nodes)
