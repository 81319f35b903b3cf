"""bench/localisation.py on a tiny hand-built ONNX model (no torch): peaks against boxes, map size, timings."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from inspection.images import encode_png
from inspection.synth import render_part

REPO = Path(__file__).resolve().parents[2]
SIZE, CELL = 304, 16  # a 19x19 map, as the finer models give


def _bench():
    spec = importlib.util.spec_from_file_location("bench_localisation", REPO / "bench" / "localisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _red_spot_model(path: Path) -> Path:
    """The inspection contract in six operators: heatmap = max-pooled (red - green) / 255 over 16 px cells, score
    = the map's maximum. A red spot planted on a grey photo is where it 'sees' the defect."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def const(name: str, values: list[int]):
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        )

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        const("c0", [0]), const("c1", [1]), const("c2", [2]), const("c3", [3]),
        helper.make_node("Slice", ["x", "c0", "c1", "c3"], ["r"]),
        helper.make_node("Slice", ["x", "c1", "c2", "c3"], ["g"]),
        helper.make_node("Sub", ["r", "g"], ["d"]),
        helper.make_node("Relu", ["d"], ["dp"]),
        helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.FLOAT, [], [1 / 255])),
        helper.make_node("Mul", ["dp", "k"], ["u"]),
        helper.make_node("Transpose", ["u"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("MaxPool", ["t"], ["p"], kernel_shape=[CELL, CELL], strides=[CELL, CELL]),
        helper.make_node("Squeeze", ["p", "c1"], ["heatmap"]),
        helper.make_node("ReduceMax", ["heatmap"], ["defect_prob"], axes=[1, 2], keepdims=0),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "red_spot",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", "H", "W", 3])],
        [
            helper.make_tensor_value_info("defect_prob", TensorProto.FLOAT, ["N"]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", "h", "w"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _photos(root: Path, n: int) -> list[dict]:
    """`n` synthetic parts with a red spot on each defect; the box is drawn around the spot, except on the last
    photo, whose box is put elsewhere on purpose (a miss)."""
    (root / "def_front").mkdir(parents=True)
    entries = []
    for i in range(n):
        image, defect = render_part(np.random.default_rng(40 + i), True, SIZE)
        ys, xs = np.nonzero(defect)
        cx, cy = int(xs.mean()), int(ys.mean())
        image[cy - 3 : cy + 4, cx - 3 : cx + 4] = (255, 0, 0)
        box = [cx - 12, cy - 12, cx + 12, cy + 12]
        if i == n - 1:
            box = [SIZE - 1 - cx - 12, SIZE - 1 - cy - 12, SIZE - 1 - cx + 12, SIZE - 1 - cy + 12]
        data = encode_png(image)
        name = f"cast_def_0_{i}.png"
        (root / "def_front" / name).write_bytes(data)
        entries.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "boxes": [box], "note": "spot"})
    return entries


def test_bench_reports_peaks_in_boxes_map_shape_and_timings(tmp_path: Path) -> None:
    bench = _bench()
    model = _red_spot_model(tmp_path / "model.onnx")
    entries = _photos(tmp_path / "data", 5)
    entries.append({"file": "cast_def_0_missing.png", "sha256": "0" * 64, "boxes": [[1, 1, 5, 5]], "note": ""})
    (tmp_path / "data" / "def_front" / "cast_def_0_changed.png").write_bytes(b"\x89PNG other bytes")
    entries.append({"file": "cast_def_0_changed.png", "sha256": "1" * 64, "boxes": [[1, 1, 5, 5]], "note": ""})
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(entries))
    out = tmp_path / "out" / "loc.json"
    report = bench.main(
        ["--model", f"red={model}", "--boxes", str(boxes), "--data", str(tmp_path / "data"), "--repeats", "2",
         "--cpu", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == report
    assert report["n_photos"] == 5 and {s["file"] for s in report["skipped"]} == {
        "cast_def_0_missing.png",
        "cast_def_0_changed.png",
    }
    r = report["models"]["red"]
    assert r["map_shape"] == [SIZE // CELL, SIZE // CELL] and r["provider"] == "CPUExecutionProvider"
    assert r["peak_in_box"] == r["part_peak_in_box"] == r["cell_hits_box"] == 0.8  # 4 of 5: the last box is elsewhere
    assert r["hits"] == {"peak_in_box": 4, "part_peak_in_box": 4, "cell_hits_box": 4}
    assert 0 < r["chance_in_part"] < 0.1 and r["part_found"] == 1.0
    assert set(r["ms_per_image"]) == {"batch_1", "batch_16"} and all(v > 0 for v in r["ms_per_image"].values())
    assert [p["peak_in_box"] for p in r["photos"]] == [True, True, True, True, False]


def test_bench_refuses_bad_arguments(tmp_path: Path) -> None:
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--model", "no-equals-sign"])
    bad = tmp_path / "boxes.json"
    bad.write_text(json.dumps([{"file": "a.png", "boxes": [[5, 5, 1, 1]]}]))
    with pytest.raises(ValueError, match="x0 < x1"):
        bench.load_boxes(bad)


def test_the_shipped_boxes_are_30_real_photos_with_sane_boxes() -> None:
    bench = _bench()
    entries = bench.load_boxes(REPO / "tests" / "data" / "defect_boxes.json")
    assert len(entries) == 30 and len({e["file"] for e in entries}) == 30 and len({e["sha256"] for e in entries}) == 30
    for e in entries:
        assert e["file"].startswith("cast_def_") and len(e["sha256"]) == 64 and e["note"]
        for x0, y0, x1, y1 in e["boxes"]:
            assert 0 <= x0 < x1 <= 299 and 0 <= y0 < y1 <= 299
            assert (x1 - x0) * (y1 - y0) < 0.05 * 300 * 300  # around a defect, not around the part
