"""Benchmark: does a model's heatmap point at the defect? Peaks against hand-drawn boxes on real photos.

    nice .venv/bin/python bench/localisation.py --model old=E7/model.onnx --model new=E19/model.onnx \\
        [--boxes tests/data/defect_boxes.json] [--data ../shared/data/casting/train] [--threads 2] [--out F.json]

`tests/data/defect_boxes.json` holds 30 real defective photos of `def_front` (one per physical part, defect
clearly visible) with a box drawn by hand around each defect, as coordinates on the 300x300 photo (only
coordinates and the photo's sha256 are in the repository, never the photos). For every exported model (any
ONNX file with the inspection contract: uint8 frames in, `defect_prob` and `heatmap` out) it runs the photos
through torch-free onnxruntime (`inspection.onnx_infer.OnnxModel`) and reports, per model:
- `peak_in_box`: share of photos whose map peak, upsampled smoothly to the photo as the review app draws it
  (`inspection.overlay.upsample_heatmap`), falls inside one of the photo's boxes;
- `part_peak_in_box`: the same for the peak inside the part's silhouette, i.e. the spot the review overlay rings;
- `cell_hits_box`: share whose hottest map cell overlaps a box (the most lenient reading of a coarse map);
- `chance_in_part`: the share a peak dropped at random on the part would score (boxes' share of the part's area);
- `map_shape`: the heatmap's h x w; `mean_score`: mean defect probability over the photos (all are defective);
- `ms_per_image`: median onnxruntime time per image at batch 1 and 16 (`--repeats` runs after 3 warm-ups),
  with the provider and thread count it ran with. Timings depend on what else runs on the machine.
Per-photo rows (peak, hit flags, score) are in `photos`. Prints one JSON object; `--out` also writes it.
A photo missing from `--data` or whose bytes differ from the recorded sha256 is skipped and listed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
logger = logging.getLogger("bench.localisation")

DEFAULT_BOXES = REPO / "tests" / "data" / "defect_boxes.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "casting" / "train"
BATCHES = (1, 16)


def load_boxes(path: Path) -> list[dict[str, Any]]:
    entries = json.loads(Path(path).read_text())
    for e in entries:
        if not e.get("boxes") or any(len(b) != 4 or b[0] >= b[2] or b[1] >= b[3] for b in e["boxes"]):
            raise ValueError(f"{path}: {e.get('file')!r} needs boxes [[x0, y0, x1, y1], ...] with x0 < x1, y0 < y1")
    return entries


def load_photos(entries: list[dict[str, Any]], data: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Entries with their decoded photo (uint8 RGB) under `data` (def_front/ first, then anywhere below)."""
    from inspection.images import decode_image

    found, skipped = [], []
    for e in entries:
        path = data / "def_front" / e["file"]
        if not path.is_file():
            path = next(iter(sorted(data.rglob(e["file"]))), path)
        if not path.is_file():
            skipped.append({"file": e["file"], "why": f"not found under {data}"})
            continue
        raw = path.read_bytes()
        if e.get("sha256") and hashlib.sha256(raw).hexdigest() != e["sha256"]:
            skipped.append({"file": e["file"], "why": "bytes differ from the recorded sha256"})
            continue
        found.append({**e, "path": str(path), "image": decode_image(raw)})
    return found, skipped


def _inside(x: float, y: float, boxes: list[list[float]]) -> bool:
    return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)


def _cell_hits(heatmap: np.ndarray, size: tuple[int, int], boxes: list[list[float]]) -> bool:
    """Does the hottest cell's footprint on the photo overlap a box? (the map covers the whole frame)"""
    h, w = heatmap.shape
    i, j = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    height, width = size
    cx0, cx1 = j * width / w, (j + 1) * width / w
    cy0, cy1 = i * height / h, (i + 1) * height / h
    return any(cx0 <= x1 and x0 <= cx1 and cy0 <= y1 and y0 <= cy1 for x0, y0, x1, y1 in boxes)


def score_peaks(photos: list[dict[str, Any]], probs: np.ndarray, heatmaps: list[np.ndarray]) -> dict[str, Any]:
    """The localisation figures of one model's outputs on `photos` (see module docstring)."""
    from inspection.overlay import heatmap_peak, part_mask, upsample_heatmap

    rows = []
    for photo, prob, heat in zip(photos, probs, heatmaps, strict=True):
        image = photo["image"]
        size = image.shape[:2]
        up = upsample_heatmap(heat, size)
        mask = part_mask(image)
        peak = heatmap_peak(up)
        part_peak = heatmap_peak(up, mask)
        area = mask if mask is not None else np.ones(size, bool)
        in_boxes = np.zeros(size, bool)
        for x0, y0, x1, y1 in photo["boxes"]:
            in_boxes[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
        rows.append(
            {
                "file": photo["file"],
                "chance": round(float((in_boxes & area).sum() / area.sum()), 4),
                "score": round(float(prob), 6),
                "peak": list(peak),
                "part_peak": list(part_peak),
                "peak_in_box": _inside(*peak, photo["boxes"]),
                "part_peak_in_box": _inside(*part_peak, photo["boxes"]),
                "cell_hits_box": _cell_hits(np.asarray(heat), size, photo["boxes"]),
                "part_found": mask is not None,
            }
        )
    n = len(rows)

    def share(key: str) -> float | None:
        return round(sum(r[key] for r in rows) / n, 4) if n else None

    return {
        "n_photos": n,
        "peak_in_box": share("peak_in_box"),
        "part_peak_in_box": share("part_peak_in_box"),
        "cell_hits_box": share("cell_hits_box"),
        "hits": {k: sum(r[k] for r in rows) for k in ("peak_in_box", "part_peak_in_box", "cell_hits_box")},
        # a peak thrown at random into the part lands in a box this often: what the shares compare with
        "chance_in_part": round(float(np.mean([r["chance"] for r in rows])), 4) if n else None,
        "part_found": share("part_found"),
        "mean_score": round(float(np.mean(probs)), 4) if n else None,
        "photos": rows,
    }


def time_model(model: Any, images: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median ms per image at each batch size, on real photos of one shape."""
    shape = images[0].shape
    same = [im for im in images if im.shape == shape] or images[:1]
    out = {}
    for batch in BATCHES:
        frames = np.stack([same[i % len(same)] for i in range(batch)])
        for _ in range(3):
            model.predict(frames)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.predict(frames)
            times.append(time.perf_counter() - t0)
        out[f"batch_{batch}"] = round(1000.0 * statistics.median(times) / batch, 3)
    return out


def evaluate(
    name: str, model_path: Path, photos: list[dict[str, Any]], threads: int, repeats: int, cpu: bool
) -> dict[str, Any]:
    from inspection.onnx_infer import OnnxModel

    model = OnnxModel(model_path, providers=["CPUExecutionProvider"] if cpu else None, threads=threads)
    images = [p["image"] for p in photos]
    probs, heatmaps = model.predict_images(images, batch_size=16)
    result = score_peaks(photos, probs, heatmaps)
    card = model.card
    return {
        "model": str(model_path),
        "version": model.version,
        "backbone": card.backbone if card else None,
        "input_size": (card.preprocess or {}).get("input_size") if card else None,
        "map_shape": list(np.asarray(heatmaps[0]).shape) if heatmaps else None,
        "provider": model.provider,
        "threads": threads,
        "ms_per_image": time_model(model, images, repeats) if images else None,
        **result,
    }


def _model_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model wants NAME=PATH/model.onnx, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=_model_arg, action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--boxes", type=Path, default=DEFAULT_BOXES, help="JSON of hand-drawn defect boxes")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding def_front/ with the photos")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size (median reported)")
    parser.add_argument("--cpu", action="store_true", help="CPU provider only (default: the best that runs)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        parser.error(f"model names must differ, got {names}")
    photos, skipped = load_photos(load_boxes(args.boxes), args.data)
    for s in skipped:
        logger.warning("skipped %s: %s", s["file"], s["why"])
    if not photos:
        parser.error(f"none of the photos of {args.boxes} is under {args.data}")
    report: dict[str, Any] = {
        "boxes": str(args.boxes),
        "data": str(args.data),
        "n_photos": len(photos),
        "skipped": skipped,
        "models": {},
    }
    for name, path in args.model:
        logger.info("model %s: %s", name, path)
        report["models"][name] = evaluate(name, path, photos, args.threads, args.repeats, args.cpu)
        r = report["models"][name]
        logger.info(
            "%s: map %s, peak in box %s, part peak in box %s, %s ms/image (batch 1 / 16)",
            name,
            r["map_shape"],
            r["peak_in_box"],
            r["part_peak_in_box"],
            r["ms_per_image"],
        )
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
