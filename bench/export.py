"""Benchmark: export a trained run to ONNX (FP32 + INT8 with its gate) and time both on this CPU.

    nice .venv/bin/python bench/export.py RUN_DIR [--out DIR] [--threads 2] [--repeats 20]

Runs the real `export_onnx` (ONNX full check, parity against PyTorch on every validation image of the run, INT8
calibrated on training images and gated on the validation images), then measures onnxruntime CPU latency per
image (median of `--repeats`) at batch 1 and 32 for FP32 and INT8 (INT8 is timed even when the gate dropped it,
from a copy kept aside), with intra-op thread spinning on (onnxruntime's default) and off. Prints one JSON object
and writes it to OUT/export_bench.json. Timings depend on what else runs on the machine: say so with them.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
logger = logging.getLogger("bench.export")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="run directory with checkpoint.pt (trained on the real images)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the export and the JSON (default: temp)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads while timing")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size (median reported)")
    parser.add_argument("--calibration-images", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import torch

    from inspection.export import ExportConfig, export_onnx
    from inspection.export import quantize as q
    from inspection.images import read_image

    torch.set_num_threads(args.threads)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="bench-export-"))
    export_dir = out_root / "export"
    if export_dir.exists():
        shutil.rmtree(export_dir)
    aside = out_root / "int8_aside.onnx"

    # Keep a copy of the INT8 file before the gate may delete it, so that its speed is reported either way.
    real_quantize = q.quantize_int8

    def quantize_and_keep(fp32_path, out_path, *a, **kw):
        path = real_quantize(fp32_path, out_path, *a, **kw)
        shutil.copy2(path, aside)
        return path

    import inspection.export.onnx_export as oe

    oe.quantize_int8 = quantize_and_keep
    config = ExportConfig(
        int8=True,
        measure_latency=False,  # timed below, the same way for both spinning settings
        calibration_images=args.calibration_images,
        latency_threads=args.threads,
        latency_repeats=args.repeats,
    )
    t0 = time.perf_counter()
    result = export_onnx(config, args.run_dir, export_dir)
    wall = time.perf_counter() - t0

    val = json.loads((args.run_dir / "samples.json").read_text())["val"]
    image = read_image(Path(val[0]["path"]))
    latency: dict[str, dict] = {}
    for spinning in (True, False):
        key = "spinning_on" if spinning else "spinning_off"
        latency[key] = {
            "fp32": q.measure_latency(
                result.model_path, image, (1, 32), args.threads, args.repeats, allow_spinning=spinning
            ),
            "int8": q.measure_latency(aside, image, (1, 32), args.threads, args.repeats, allow_spinning=spinning),
        }
    speedup = {k: {b: round(v["fp32"][b] / v["int8"][b], 3) for b in v["fp32"]} for k, v in latency.items()}
    int8 = result.int8.to_dict() if result.int8 else {}
    report = {
        "run_dir": str(args.run_dir),
        "backbone": result.card.backbone,
        "input_size": result.card.preprocess.get("input_size"),
        "camera_frame_hw": list(image.shape[:2]),
        "export_seconds": round(result.export_seconds, 2),
        "export_wall_seconds": round(wall, 2),
        "dynamic_size": result.dynamic_size,
        "model_mb": round(result.model_path.stat().st_size / 1e6, 2),
        "int8_mb": round(aside.stat().st_size / 1e6, 2),
        "parity": {
            k: result.parity.to_dict()[k]
            for k in ("n_images", "max_prob_diff", "mean_prob_diff", "max_heatmap_diff", "verdict_agreement")
        },
        "shape_parity": (
            {k: result.shape_parity.to_dict()[k] for k in ("n_images", "shapes", "max_prob_diff", "verdict_agreement")}
            if result.shape_parity
            else None
        ),
        "int8": {
            k: int8.get(k)
            for k in (
                "kept",
                "reason",
                "n_val",
                "verdict_agreement",
                "n_verdict_changes",
                "new_escapes",
                "max_prob_diff",
            )
        },
        "latency_ms_per_image": latency,
        "int8_speedup": speedup,
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "note": "2-core box shared with other jobs: latencies are upper bounds, compare them only within this run",
    }
    text = json.dumps(report, indent=2)
    (out_root / "export_bench.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
