"""Fill a decision store with synthetic inspections, so the review app can be tried (and tested) without a line.

Each part is a built-in synthetic casting (`inspection.synth.render_part`) recorded through
`DecisionStore.record_inspection`, exactly as the runner records it, with a heatmap that glows where the drawn
defect really is (a fake model output: no model is run here).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np

from inspection.decisions import DecisionStore
from inspection.images import encode_png
from inspection.schemas import InspectionResult, Thresholds, Verdict
from inspection.synth import DEFECT_FOLDER, OK_FOLDER, render_part
from inspection.thresholds import verdict_for

logger = logging.getLogger(__name__)

DEMO_THRESHOLDS = Thresholds(reject=0.7, review=0.3)


@dataclass(frozen=True)
class SeededPart:
    request_id: str
    verdict: str
    defect: bool
    timestamp: datetime
    station: str
    model_version: str


def fake_heatmap(mask: np.ndarray, rng: np.random.Generator, size: int = 10) -> np.ndarray:
    """(size, size) float32 in [0, 1]: the defect mask blurred down to feature-map resolution, plus noise."""
    small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)  # (size, size)
    small = cv2.GaussianBlur(small, (3, 3), 0.8)
    if small.max() > 0:
        small = small / small.max()
    small = 0.85 * small + 0.15 * rng.random((size, size), dtype=np.float32)
    return np.clip(small, 0.0, 1.0).astype(np.float32)


def seed_store(
    store: DecisionStore,
    n: int = 12,
    seed: int = 0,
    now: datetime | None = None,
    stations: tuple[str, ...] = ("line-1", "line-2"),
    model_versions: tuple[str, ...] = ("v0001", "v0002"),
    spacing: timedelta = timedelta(minutes=7),
    image_size: int = 300,
    n_pass: int = 0,
) -> list[SeededPart]:
    """Record `n` flagged parts (review or reject, oldest first) and `n_pass` passed ones; returns what was made."""
    rng = np.random.default_rng(seed)
    end = (now or datetime.now(UTC)).astimezone(UTC)
    made: list[SeededPart] = []
    total = n + n_pass
    for i in range(total):
        flagged = i < n
        defect = bool(flagged and rng.random() < 0.6)
        image, mask = render_part(rng, defect, image_size)
        if flagged:
            score = float(rng.uniform(0.72, 0.99) if defect else rng.uniform(0.31, 0.69))
        else:
            score = float(rng.uniform(0.0, 0.29))
        verdict = verdict_for(score, DEMO_THRESHOLDS)
        timestamp = end - spacing * (total - i)
        station = stations[i % len(stations)]
        version = model_versions[(i // 3) % len(model_versions)]
        request_id = uuid.UUID(bytes=rng.bytes(16), version=4).hex
        result = InspectionResult(
            request_id=request_id,
            part_id=f"P{seed:02d}-{i:05d}",
            station=station,
            timestamp=timestamp,
            verdict=verdict,
            defect_score=score,
            thresholds=DEMO_THRESHOLDS,
            model_version=version,
            latency_ms=float(rng.uniform(8, 30)),
        )
        heatmap = fake_heatmap(mask if defect else np.zeros_like(mask), rng)
        store.record_inspection(result, encode_png(image), heatmap, "http")
        made.append(SeededPart(request_id, verdict.value, defect, timestamp, station, version))
    logger.info(
        "seeded %d parts (%d flagged) into %s",
        total,
        sum(p.verdict != Verdict.pass_.value for p in made),
        store.url.split("@")[-1],
    )
    return made


def write_mixed_label_folder(out: Path, n_parts: int = 6, copies: int = 3, seed: int = 0) -> dict[str, int]:
    """A def_front/ok_front drop folder of `n_parts` synthetic parts, each photographed `copies` times (turned by
    90 degrees and mirrored), where the first part's copies sit in both folders: after `inspection ingest` it is
    one physical part labelled both ways, as on the real line. Returns {"defect": k, "ok": m} photos written."""
    if n_parts < 2 or not 2 <= copies <= 8:
        raise ValueError(f"need at least 2 parts and 2..8 copies each, got {n_parts} parts x {copies} copies")
    rng = np.random.default_rng(seed)
    counts = {"defect": 0, "ok": 0}
    for folder in (DEFECT_FOLDER, OK_FOLDER):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for part in range(n_parts):
        defect = part % 2 == 0
        image, _ = render_part(rng, defect, 300)
        for k in range(copies):
            view = np.rot90(image, k % 4)
            if (k % 2 == 1) != (k >= 4):  # the 8 turns and mirror images of the part, each once
                view = view[:, ::-1]
            # part 0: its first copy is filed as defect, the others as ok, whatever it really is
            label = ("defect" if k == 0 else "ok") if part == 0 else ("defect" if defect else "ok")
            folder = DEFECT_FOLDER if label == "defect" else OK_FOLDER
            path = out / folder / f"part{part:02d}_view{k}.png"
            path.write_bytes(encode_png(np.ascontiguousarray(view)))
            counts[label] += 1
    logger.info("wrote %d parts x %d views into %s (part 0 labelled both ways)", n_parts, copies, out)
    return counts
