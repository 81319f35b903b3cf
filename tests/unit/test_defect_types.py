"""Defect types (issue #16): a run whose labels name types learns them beside the defect head; the card lists them,
the export answers their probabilities as a third output, parity-checked, and the verdict stays P(defect)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.test_crossfit import grouped_store, head_config, tiny_weights  # noqa: F401 - fixtures


def typed_samples(store: Path) -> list:
    from inspection.ingest import load_samples

    samples = [s for s in load_samples(store) if s.label is not None]
    kinds = {}
    out = []
    for s in samples:
        if s.label == "defect":
            kinds.setdefault(s.group_id, ("crack", "blowhole", "chip")[len(kinds) % 3])
            s = replace(s, defect_type=kinds[s.group_id])
        out.append(s)
    return out


def test_a_typed_run_learns_the_types_and_the_export_answers_them(
    grouped_store: Path,  # noqa: F811
    tiny_weights: Path,  # noqa: F811
    tmp_path: Path,
):
    from inspection.export import ExportConfig, export_onnx
    from inspection.images import read_image
    from inspection.onnx_infer import TYPE_OUTPUT, OnnxModel
    from inspection.train import load_run, run_train

    samples = typed_samples(grouped_store)
    result = run_train(head_config(tiny_weights), samples, tmp_path / "run")
    assert result.card.defect_types == ["blowhole", "chip", "crack"]
    report = result.card.type_metrics
    mixed = set(result.excluded["mixed_label_parts"])  # the part filed both ways stays out of types too
    assert report["n_photos"] == sum(1 for s in samples if s.defect_type and s.group_id not in mixed)
    confusion = np.asarray(report["oof_confusion"])  # every typed photo scored out of fold, once
    assert confusion.shape == (3, 3) and confusion.sum() == report["n_photos"]
    assert report["oof_accuracy"]["photo"]["value"] == pytest.approx(np.trace(confusion) / confusion.sum())
    run = load_run(tmp_path / "run")  # the type head survives the checkpoint
    assert run.net.type_names == ("blowhole", "chip", "crack")
    export = export_onnx(ExportConfig(max_parity_images=8), tmp_path / "run", tmp_path / "export")
    assert any("defect types" in n for n in export.notes)
    model = OnnxModel(export.model_path, providers=["CPUExecutionProvider"])
    assert [o.name for o in model.session.get_outputs()][-1] == TYPE_OUTPUT and model.type_names == report["types"]
    images = np.stack([read_image(s.path) for s in samples[:4]])
    probs, heat, types = model.predict_with_types(images)
    assert types.shape == (4, 3) and np.allclose(types.sum(axis=1), 1, atol=1e-5)
    with torch.no_grad():
        ref_p, _, ref_t = run.net(torch.from_numpy(images))
    assert np.allclose(types, ref_t.numpy(), atol=1e-4) and np.allclose(probs, ref_p.numpy(), atol=1e-4)
    p2, _ = model.predict(images)  # the verdict path is unchanged: P(defect) from the defect head
    assert np.array_equal(p2, probs)


def test_an_untyped_run_has_no_type_output(grouped_store: Path, tiny_weights: Path, tmp_path: Path):  # noqa: F811
    from inspection.train import run_train

    result = run_train(head_config(tiny_weights), grouped_store, tmp_path / "run")
    assert result.card.defect_types == [] and result.card.type_metrics == {}
    with pytest.raises(ValueError, match="bogus"):  # the card is a strict contract: unknown fields are refused
        type(result.card).model_validate({**result.card.model_dump(), "bogus": 1})
