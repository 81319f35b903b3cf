"""Export a trained run to one self-contained ONNX file whose graph holds the preprocessing and the CAM heatmap.

The traced module is the same `InspectionNet.forward` the trainer evaluates: uint8 (N, H, W, 3) camera frames
in, resize + normalise inside, (defect_prob (N,), heatmap (N, h, w)) out. The export is refused unless the
ONNX full check passes and onnxruntime reproduces PyTorch on every validation image of the run (probabilities
within `max_prob_diff`, identical verdicts), so the line can never score differently from the evaluation.

Output folder (`out/`): model.onnx [model.int8.onnx] [model.fp16.onnx], model_card.json (files = sha256 of
each model file), metrics.json, plots/, parity.json, export.json (this result), export_config.yaml.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from inspection import __version__
from inspection.config import save_config
from inspection.drift import REFERENCE_FILE
from inspection.errors import ConfigError, DataError, InspectionError
from inspection.export.config import ExportConfig
from inspection.export.parity import ParityReport, check_parity, rejudge, resolve_threshold_ties
from inspection.export.quantize import Int8Report, convert_fp16, int8_gate, measure_latency, quantize_int8
from inspection.images import read_image
from inspection.onnx_infer import CARD_FILE, INPUT_NAME, OnnxModel, output_names, sha256_file
from inspection.registry import TRAINING_SET_FILE
from inspection.schemas import ModelCard
from inspection.thresholds import verdicts_for

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
PARITY_PHOTOS = 1000  # parity photos of a cross-fitted run, spread over all of its parts
TYPE_PARITY_LIMIT = 1e-3  # defect-type probabilities: not a verdict, but QA reads them
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"
IO_DESCRIPTION = (
    "input images: uint8 (N, H, W, 3) RGB, N/H/W dynamic; outputs defect_prob: float32 (N,), "
    "heatmap: float32 (N, h, w) in [0, 1]"
)


class ExportCheckError(InspectionError):
    """The exported model failed a check (ONNX full check or parity with PyTorch); nothing was written."""


class SampleLike(Protocol):
    path: Path
    label: str | None


@dataclass
class ExportResult:
    out: Path
    model_path: Path
    card: ModelCard
    parity: ParityReport
    shape_parity: ParityReport | None  # random non-square frames: proves the dynamic H/W path
    dynamic_size: bool
    export_seconds: float
    int8: Int8Report | None = None
    int8_path: Path | None = None
    fp16_path: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "model_path": str(self.model_path),
            "int8_path": str(self.int8_path) if self.int8_path else None,
            "fp16_path": str(self.fp16_path) if self.fp16_path else None,
            "version": self.card.version,
            "dynamic_size": self.dynamic_size,
            "export_seconds": round(self.export_seconds, 3),
            "parity": self.parity.to_dict(),
            "shape_parity": self.shape_parity.to_dict() if self.shape_parity else None,
            "int8": self.int8.to_dict() if self.int8 else None,
            "files": self.files,
            "notes": self.notes,
        }


def export_onnx(config: ExportConfig, run_dir: str | Path, out: str | Path) -> ExportResult:
    """Export the run in `run_dir` (see docs/CONTRACTS.md) into the new folder `out`."""
    from inspection.train import load_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    run = load_run(run_dir)
    train = run.samples.get("train", [])
    check = run.samples.get("val", [])
    if not check:  # a cross-fitted run has no val split (every part was out of fold once): check on its photos
        check = train[:: max(1, len(train) // PARITY_PHOTOS)]
    return export_net(config, run.net, run.card, out, val=check, train=train, run_dir=run_dir)


def export_net(
    config: ExportConfig,
    net: torch.nn.Module,
    card: ModelCard,
    out: str | Path,
    val: Sequence[SampleLike],
    train: Sequence[SampleLike] = (),
    run_dir: str | Path | None = None,
    calibration_override: Sequence[np.ndarray] | None = None,
) -> ExportResult:
    """Export `net` with `card`, checked on the `val` images; `train` images calibrate INT8.

    `calibration_override` replaces the training images for INT8 calibration (tests use it to poison the ranges).
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty; choose a new folder (nothing was changed)")
    net = net.eval().cpu()
    val = list(val)[: config.max_parity_images] if config.max_parity_images else list(val)
    if not val:
        raise DataError("the run has no validation images: the parity check needs them (samples.json 'val')")
    val_images = [read_image(s.path) for s in val]
    val_labels = [str(s.label) if s.label is not None else None for s in val]
    embedded = card.model_copy(update={"files": {}})

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        notes: list[str] = []
        model_path = tmp / MODEL_FILE
        dynamic = trace_to_onnx(net, model_path, val_images[0], config.dynamic_size, notes)
        write_metadata(model_path, embedded, precision="fp32", dynamic_size=dynamic)
        full_check(model_path)

        parity = check_parity(
            net,
            model_path,
            val_images,
            card.thresholds,
            config.max_prob_diff,
            config.max_heatmap_diff,
            config.parity_batch_size,
        )
        if not parity.passed and parity.n_verdict_mismatch and len(parity.failures) == 1:
            card, parity = _resolve_ties(parity, card, notes)
            embedded = card.model_copy(update={"files": {}})
            write_metadata(model_path, embedded, precision="fp32", dynamic_size=dynamic)
        if getattr(net, "type_head", None) is not None:
            type_diff = _type_parity(net, model_path, val_images)
            notes.append(f"defect types {list(net.type_names)}: max |Δtype probability| {type_diff:.2e}")
            if type_diff > TYPE_PARITY_LIMIT:
                raise ExportCheckError(f"ONNX defect-type probabilities differ from PyTorch by {type_diff:.2e}")
        (tmp / "parity.json").write_text(json.dumps(parity.to_dict(), indent=2))
        if not parity.passed:
            raise ExportCheckError(
                f"ONNX does not reproduce PyTorch on the validation images: {'; '.join(parity.failures)}"
            )
        shape_parity = None
        if dynamic:
            shape_parity = _check_other_shapes(net, model_path, val_images[0], card, config)

        result = ExportResult(
            out=out,
            model_path=out / MODEL_FILE,
            card=card,
            parity=parity,
            shape_parity=shape_parity,
            dynamic_size=dynamic,
            export_seconds=0.0,
            notes=notes,
        )
        if config.int8:
            calib = (
                list(calibration_override)
                if calibration_override is not None
                else _calibration_images(train, config.calibration_images, config.seed)
            )
            result.int8 = _int8(config, tmp, model_path, calib, val_images, val_labels, card)
            if result.int8.kept:
                result.int8_path = out / INT8_FILE
            else:
                notes.append(result.int8.reason)
        if config.fp16:
            convert_fp16(model_path, tmp / FP16_FILE)
            write_metadata(tmp / FP16_FILE, embedded, precision="fp16", dynamic_size=dynamic)
            full_check(tmp / FP16_FILE)
            result.fp16_path = out / FP16_FILE
            notes.append("model.fp16.onnx is meant for GPU providers; its parity is not checked on this CPU")

        _copy_run_artifacts(run_dir, tmp, card)
        model_files = [p.name for p in (model_path, tmp / INT8_FILE, tmp / FP16_FILE) if p.is_file()]
        result.files = {name: sha256_file(tmp / name) for name in model_files}
        # FP32 only: INT8 and FP16 kernels differ between CPUs and GPUs by more than the runner's tolerance
        _write_smoke_reference(tmp, [MODEL_FILE], int(card.preprocess.get("input_size", 224)))
        final_card = card.model_copy(update={"files": result.files})
        (tmp / CARD_FILE).write_text(final_card.model_dump_json(indent=2))
        save_config(config, tmp / "export_config.yaml")
        result.export_seconds = time.perf_counter() - t_start
        (tmp / "export.json").write_text(json.dumps(result.to_dict(), indent=2))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.card = final_card
    logger.info(
        "exported %s in %.1f s: %s%s",
        out,
        result.export_seconds,
        ", ".join(result.files),
        f" ({result.int8.reason})" if result.int8 else "",
    )
    return result


def _write_smoke_reference(folder: Path, model_files: Sequence[str], input_size: int) -> None:
    """Each model file's outputs on the runner's smoke frames: the runner refuses a file whose weights were damaged
    before it was hashed (valid ONNX, right sha256 of the damaged bytes, sane-looking scores) by comparing them."""
    from inspection.runner.inferencer import REFERENCE_FILE, smoke_reference

    refs = {
        name: smoke_reference(OnnxModel(folder / name, providers=["CPUExecutionProvider"]), input_size)
        for name in model_files
    }
    (folder / REFERENCE_FILE).write_text(json.dumps(refs))


def _type_parity(net: torch.nn.Module, path: Path, images: Sequence[np.ndarray], n: int = 64) -> float:
    """Largest difference between ONNX and PyTorch defect-type probabilities on up to `n` images of one shape."""
    same = [im for im in images if im.shape == images[0].shape][:n]
    batch = np.stack(same)
    with torch.inference_mode():
        ref = net(torch.from_numpy(batch))[2].numpy()
    _, _, got = OnnxModel(path, providers=["CPUExecutionProvider"]).predict_with_types(batch)
    return float(np.abs(ref - got).max()) if got is not None else float("inf")


def trace_to_onnx(net: torch.nn.Module, path: Path, example: np.ndarray, dynamic_size: bool, notes: list[str]) -> bool:
    """Dynamo export with dynamic batch (and H/W when asked); returns whether H/W are dynamic."""
    from torch.export import Dim

    x = torch.from_numpy(np.stack([example, example]))  # batch 2: a batch of 1 would be specialised away
    attempts = []
    if dynamic_size:
        attempts.append((True, {INPUT_NAME: {0: Dim("batch"), 1: Dim("height"), 2: Dim("width")}}))
    attempts.append((False, {INPUT_NAME: {0: Dim("batch")}}))
    last_exc: Exception | None = None
    for dyn, shapes in attempts:
        try:
            with torch.inference_mode(False), torch.no_grad():
                program = torch.onnx.export(
                    net,
                    (x,),
                    input_names=[INPUT_NAME],
                    output_names=list(output_names(getattr(net, "type_head", None) is not None)),
                    dynamic_shapes=shapes,
                    external_data=False,
                    dynamo=True,
                    verbose=False,
                )
            program.save(str(path), external_data=False)
        except Exception as exc:  # noqa: BLE001 - the fallback below is the documented answer
            last_exc = exc
            if dyn:
                msg = (
                    f"dynamic height/width failed in the dynamo exporter ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}); exported for the camera size {example.shape[1]}x"
                    f"{example.shape[0]} with dynamic batch only"
                )
                logger.warning(msg)
                notes.append(msg)
                continue
            raise ExportCheckError(f"torch.onnx.export failed: {exc}") from exc
        if path.with_name(path.name + ".data").exists():
            raise ExportCheckError(f"the exporter wrote external data next to {path}; expected one file")
        return dyn
    raise ExportCheckError(f"torch.onnx.export failed: {last_exc}")  # pragma: no cover


def _resolve_ties(parity: ParityReport, card: ModelCard, notes: list[str]) -> tuple[ModelCard, ParityReport]:
    """Verdicts differ with scores within limits: a threshold sitting on a validation score? Move it off."""
    assert parity.ref_probs is not None and parity.got_probs is not None
    resolved = resolve_threshold_ties(parity.ref_probs, parity.got_probs, card.thresholds)
    if resolved is None:
        return card, parity
    thresholds, moved = resolved
    again = rejudge(parity, thresholds)
    unchanged = (verdicts_for(parity.ref_probs, thresholds) == verdicts_for(parity.ref_probs, card.thresholds)).all()
    if not again.passed or not moved or not unchanged:
        return card, parity
    for line in moved:
        logger.warning("%s", line)
    notes.extend(moved)
    card_notes = "; ".join([card.notes, *moved] if card.notes else moved)
    return card.model_copy(update={"thresholds": thresholds, "notes": card_notes}), again


def write_metadata(path: Path, card: ModelCard, precision: str, dynamic_size: bool) -> None:
    """Embed the model card (files={}) and a few flat keys for tools that cannot parse JSON."""
    import onnx

    model = onnx.load(str(path))
    pre = card.preprocess
    props = {
        "model_card": card.model_dump_json(),
        "version": card.version,
        "backbone": card.backbone,
        "class_names": json.dumps(card.class_names),
        "threshold_reject": repr(card.thresholds.reject),
        "threshold_review": repr(card.thresholds.review),
        "input_size": str(pre.get("input_size", "")),
        "resize": str(pre.get("resize", "squash")),  # cards from before letterbox existed squashed
        "mean": json.dumps(pre.get("mean")),
        "std": json.dumps(pre.get("std")),
        "data_fingerprint": card.data_fingerprint,
        "precision": precision,
        "dynamic_size": str(dynamic_size).lower(),
        "io": IO_DESCRIPTION,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "exporter": f"inspection {__version__}, torch {torch.__version__}",
    }
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"inspection model {card.version}: {IO_DESCRIPTION}"
    onnx.save(model, str(path))


def full_check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportCheckError(f"onnx.checker (full check) refused {path.name}: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    inputs = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    if inputs != [(INPUT_NAME, onnx.TensorProto.UINT8)]:
        raise ExportCheckError(f"{path.name} has inputs {inputs}; the contract is one uint8 input {INPUT_NAME!r}")
    outputs = [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    names = output_names(len(outputs) == 3)
    expected = [(name, onnx.TensorProto.FLOAT) for name in names]
    if outputs != expected:
        raise ExportCheckError(f"{path.name} has outputs {outputs}; the contract is float32 {list(names)}")


def _check_other_shapes(
    net: torch.nn.Module, path: Path, example: np.ndarray, card: ModelCard, config: ExportConfig
) -> ParityReport:
    """Parity on random frames of a size and aspect the tracer never saw (batches of 1 and 5)."""
    rng = np.random.default_rng(config.seed)
    h, w = example.shape[:2]
    shapes = [(max(32, int(h * 0.8)), max(32, int(w * 1.25))), (max(32, h + 17), max(32, w // 2))]
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes for _ in range(5)][:6]
    if h != w:  # the example turned on its side: letterbox pads the other axis then
        images.append(rng.integers(0, 256, (w, h, 3), dtype=np.uint8))
    # random-noise frames are far from any photo: a strongly regularised head on thousands of features can sit on
    # a steep part of the sigmoid there, and the two runtimes' bilinear resizes of an odd size differ in the last
    # bits; this check proves the dynamic-size path (a broken one is off by tenths), the photo check above the
    # numbers, so it allows 10x the photo tolerance
    report = check_parity(
        net,
        path,
        images,
        card.thresholds,
        10 * config.max_prob_diff,
        10 * config.max_heatmap_diff,
        config.parity_batch_size,
    )
    if not report.passed:
        raise ExportCheckError(f"ONNX differs from PyTorch on frames of other sizes: {'; '.join(report.failures)}")
    return report


def _calibration_images(train: Sequence[SampleLike], n: int, seed: int) -> list[np.ndarray]:
    if not train:
        raise DataError("INT8 needs the run's training images for calibration, and samples.json lists none")
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(train))[:n]
    return [read_image(train[i].path) for i in sorted(idx)]


def _int8(
    config: ExportConfig,
    tmp: Path,
    fp32_path: Path,
    calib: list[np.ndarray],
    val_images: list[np.ndarray],
    val_labels: list[str | None],
    card: ModelCard,
) -> Int8Report:
    int8_path = tmp / INT8_FILE
    quantize_int8(fp32_path, int8_path, calib, config.calibration_batch_size, config.calibration_method)
    write_metadata(int8_path, card.model_copy(update={"files": {}}), precision="int8", dynamic_size=True)
    full_check(int8_path)
    fp32 = OnnxModel(fp32_path, providers=["CPUExecutionProvider"], threads=config.latency_threads)
    int8 = OnnxModel(int8_path, providers=["CPUExecutionProvider"], threads=config.latency_threads)
    p32, _ = fp32.predict_images(val_images, config.parity_batch_size)
    p8, _ = int8.predict_images(val_images, config.parity_batch_size)
    kept, reason, figures = int8_gate(p32, p8, val_labels, card.thresholds, config.int8_min_agreement)
    latency: dict[str, dict[str, float]] = {}
    speedup: dict[str, float] = {}
    if config.measure_latency:
        args = (val_images[0], config.latency_batch_sizes, config.latency_threads, config.latency_repeats)
        latency = {"fp32": measure_latency(fp32_path, *args), "int8": measure_latency(int8_path, *args)}
        speedup = {b: round(latency["fp32"][b] / latency["int8"][b], 3) for b in latency["fp32"]}
    (logger.info if kept else logger.warning)("%s; latency ms/image %s, speed-up %s", reason, latency, speedup)
    if not kept:
        int8_path.unlink()
    return Int8Report(
        kept=kept,
        reason=reason,
        min_agreement=config.int8_min_agreement,
        n_calibration=len(calib),
        latency_ms_per_image=latency,
        speedup=speedup,
        **figures,
    )


def _copy_run_artifacts(run_dir: str | Path | None, tmp: Path, card: ModelCard) -> None:
    """metrics.json, plots/, the drift reference and the training set travel with the model into the registry."""
    run_dir = Path(run_dir) if run_dir else None
    for name in (REFERENCE_FILE, TRAINING_SET_FILE):
        if run_dir and (run_dir / name).is_file():
            shutil.copy2(run_dir / name, tmp / name)
    if run_dir and (run_dir / "metrics.json").is_file():
        shutil.copy2(run_dir / "metrics.json", tmp / "metrics.json")
    else:
        metrics = {split: m.model_dump() for split, m in card.metrics.items()}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if run_dir and (run_dir / "plots").is_dir():
        shutil.copytree(run_dir / "plots", tmp / "plots")
    else:
        (tmp / "plots").mkdir()
