"""The model as the runner uses it: one registry version loaded in onnxruntime, verified, warm (no torch).

`load_inferencer` resolves a registry version, checks the model file's sha256, lets `select_providers` decide by
trying which execution provider really runs here (TensorRT, then CUDA, then CPU), runs a smoke inference that
must give sane outputs, and warms the session up. Where the version carries `smoke_reference.json` (the model's
outputs on the smoke frames, recorded when it was exported: `smoke_reference`), the smoke outputs must match it:
a file damaged before it was hashed (a valid ONNX graph with some weights zeroed) passes the sha256 and gives
sane-looking scores, and only a reference tells it from the model that was exported.
`Inferencer.predict` takes decoded camera frames of any sizes and groups them by shape, because the graph takes
one (N, H, W, 3) tensor per call. A model that learned defect types (a third output, `card.defect_types`) also
gives each part its most likely type and that type's probability; the verdict stays with the defect score.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inspection.errors import InspectionError
from inspection.preprocess import PreprocessConfig, content_box
from inspection.schemas import DEFECT_TYPE_PATTERN, ModelCard, Thresholds

logger = logging.getLogger(__name__)


class ModelRejectedError(InspectionError):
    """A model version failed verification (sha256, smoke inference) and must not serve."""


REFERENCE_FILE = "smoke_reference.json"  # model file name -> its scores and heatmaps on the smoke frames
# Same file, same frames: onnxruntime agrees with itself across CPUs and providers to ~1e-5 (FP32); a few KiB of
# damaged weights move the outputs by 1e-3 to 5e-2 (bench/faults.py).
REFERENCE_TOLERANCE = 1e-3


def smoke_frames(size: int) -> list[np.ndarray]:
    """The synthetic frames every candidate model is run on before it may serve (deterministic)."""
    rng = np.random.default_rng(0)
    return [
        np.full((size, size, 3), 128, np.uint8),
        rng.integers(0, 256, (size + 13, size + 7, 3), dtype=np.uint8),  # the graph must resize any frame
    ]


def smoke_reference(model, input_size: int) -> dict[str, list]:
    """A model's outputs on the smoke frames (`model`: an OnnxModel or an Inferencer's model), to be written as
    `{model file name: this}` into the export's smoke_reference.json when the model is known good."""
    typed = bool(getattr(model, "type_names", ()))
    scores, heatmaps, type_probs = [], [], []
    for frame in smoke_frames(input_size):
        if typed:  # a damaged type head must be caught too
            probs, heat, types = model.predict_with_types(frame[None])
            type_probs.append(np.asarray(types[0], np.float64).round(7).tolist())
        else:
            probs, heat = model.predict(frame[None])
        scores.append(float(np.asarray(probs).reshape(-1)[0]))
        heatmaps.append(np.asarray(heat[0], np.float64).round(7).tolist())
    out: dict[str, list] = {"scores": scores, "heatmaps": heatmaps}
    if typed:
        out["type_probs"] = type_probs
    return out


@dataclass(frozen=True)
class Prediction:
    score: float  # defect probability in [0, 1]
    heatmap: np.ndarray  # (h, w) float32 in [0, 1]
    version: str  # the model version that produced it (a swap may happen between two batches)
    thresholds: Thresholds
    type_probs: np.ndarray | None = None  # (T,) probabilities of the defect types, given a defect; None: untyped
    type_names: tuple[str, ...] = ()  # names of type_probs, in order (card.defect_types)

    @property
    def defect_type(self) -> str | None:
        """The most likely defect type (a typed model), else None."""
        if self.type_probs is None or not self.type_names:
            return None
        return self.type_names[int(np.argmax(self.type_probs))]

    @property
    def defect_type_probability(self) -> float | None:
        if self.type_probs is None or not self.type_names:
            return None
        return float(min(max(float(np.max(self.type_probs)), 0.0), 1.0))


class Inferencer:
    """A loaded, verified and warm model version. Thread-compatible: one batch at a time per instance."""

    def __init__(self, model, version: str, card: ModelCard, model_path: Path):
        self.model = model  # inspection.onnx_infer.OnnxModel (duck-typed: .predict(batch, busy), .provider)
        self.version = version
        self.card = card
        self.model_path = Path(model_path)
        self.thresholds = card.thresholds
        self.provider = str(getattr(model, "provider", "unknown"))
        self.input_size = int(card.preprocess.get("input_size", 224))
        known = {"input_size", "mean", "std"} <= set(card.preprocess)  # stand-in cards of tests may carry less
        self.preprocess = PreprocessConfig.from_dict(card.preprocess) if known else PreprocessConfig(self.input_size)
        self.loaded_at = time.time()
        # the types the model really answers (a typed graph with a card naming them; OnnxModel.type_names)
        self.type_names: tuple[str, ...] = tuple(getattr(model, "type_names", ()) or ())

    def predict(self, images: Sequence[np.ndarray], busy: bool = False) -> list[Prediction]:
        """uint8 RGB frames (H_i, W_i, 3) -> one Prediction each, in order (frames grouped by shape).

        `busy`: other batches are in flight, so a model with a busy session (CPU) uses it."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        out: list[Prediction | None] = [None] * len(images)
        for indices in groups.values():
            # (N, H, W, 3); a single frame is a view, no copy
            batch = images[indices[0]][None] if len(indices) == 1 else np.stack([images[i] for i in indices])
            batch = np.ascontiguousarray(batch, dtype=np.uint8)
            types = None
            if self.type_names:
                probs, heatmaps, types = self.model.predict_with_types(batch, busy=busy)
                types = self._checked_types(types, len(indices))
            else:
                probs, heatmaps = self.model.predict(batch, busy=busy)
            probs = np.asarray(probs, dtype=np.float32).reshape(-1)
            if probs.shape[0] != len(indices) or not np.all(np.isfinite(probs)):
                raise ModelRejectedError(
                    f"model {self.version} returned {probs.shape[0]} scores for {len(indices)} images "
                    f"(finite: {bool(np.all(np.isfinite(probs)))})"
                )
            for j, i in enumerate(indices):
                score = float(min(max(probs[j], 0.0), 1.0))
                row = None if types is None else types[j]
                heat = self._on_the_photo(heatmaps[j], images[i].shape)
                out[i] = Prediction(score, heat, self.version, self.thresholds, row, self.type_names)
        return out  # type: ignore[return-value]

    def _on_the_photo(self, heatmap: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A letterboxed model's map covers the padded square: keep the cells over the photo, so the stored map
        lies over the photo as the review app draws it (a squash model's map already does)."""
        if self.preprocess.resize != "letterbox":
            return heatmap
        top, left, bottom, right = content_box(self.preprocess, shape[0], shape[1])
        h, w = heatmap.shape[-2:]
        r0, r1 = int(np.floor(top * h)), max(int(np.ceil(bottom * h)), int(np.floor(top * h)) + 1)
        c0, c1 = int(np.floor(left * w)), max(int(np.ceil(right * w)), int(np.floor(left * w)) + 1)
        return np.ascontiguousarray(heatmap[..., r0:r1, c0:c1])

    def _checked_types(self, types: np.ndarray | None, n: int) -> np.ndarray:
        """The (N, T) type probabilities, or ModelRejectedError when they break the contract."""
        arr = None if types is None else np.asarray(types, dtype=np.float32)
        if arr is None or arr.shape != (n, len(self.type_names)) or not np.all(np.isfinite(arr)):
            raise ModelRejectedError(
                f"model {self.version} returned defect-type probabilities of shape "
                f"{None if arr is None else arr.shape} for {n} images and types {list(self.type_names)}"
            )
        return arr

    def smoke_test(self, runs: int = 1) -> None:
        """Run synthetic frames through the model; raise ModelRejectedError unless outputs are sane."""
        frames = smoke_frames(self.input_size)
        for _ in range(max(1, runs)):
            try:
                preds = self.predict(frames)
            except ModelRejectedError:
                raise
            except Exception as exc:  # onnxruntime raises its own types: any failure means "do not serve"
                raise ModelRejectedError(f"model {self.version}: smoke inference failed: {exc}") from exc
            for p in preds:
                if not 0.0 <= p.score <= 1.0 or p.heatmap.ndim != 2 or not np.all(np.isfinite(p.heatmap)):
                    raise ModelRejectedError(
                        f"model {self.version}: smoke output out of contract (score {p.score}, heatmap "
                        f"shape {getattr(p.heatmap, 'shape', None)})"
                    )
                types = p.type_probs
                if types is not None and not (np.all(types >= -1e-6) and np.all(types <= 1 + 1e-6)):
                    raise ModelRejectedError(f"model {self.version}: defect-type probabilities {types} not in 0..1")

    def check_reference(self, reference: dict, tolerance: float = REFERENCE_TOLERANCE) -> float:
        """Raise ModelRejectedError unless the outputs on the smoke frames match `reference` (see
        `smoke_reference`); returns the largest difference."""
        frames = smoke_frames(self.input_size)
        preds = self.predict(frames)
        try:
            diffs = [abs(p.score - float(ref)) for p, ref in zip(preds, reference["scores"], strict=True)]
            for p, ref in zip(preds, reference["heatmaps"], strict=True):
                ref_map = np.asarray(ref, np.float64)
                if ref_map.shape != p.heatmap.shape:
                    raise ModelRejectedError(
                        f"model {self.version}: heatmap {p.heatmap.shape} where its reference has {ref_map.shape}"
                    )
                diffs.append(float(np.max(np.abs(p.heatmap - ref_map))))
            if "type_probs" in reference:  # recorded for a typed model
                for p, ref in zip(preds, reference["type_probs"], strict=True):
                    if p.type_probs is None:
                        raise ModelRejectedError(f"model {self.version}: no defect types where its reference has them")
                    diffs.append(float(np.max(np.abs(p.type_probs - np.asarray(ref, np.float64)))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelRejectedError(f"model {self.version}: {REFERENCE_FILE} is unusable: {exc}") from None
        worst = max(diffs)
        if not worst <= tolerance:
            raise ModelRejectedError(
                f"model {self.version}: outputs on the smoke frames differ from the exported model's reference by "
                f"{worst:.2e} (allowed {tolerance:.0e}): the file is not the model that was exported"
            )
        return worst

    def warm_up_peak(self, batch_size: int, concurrent: int) -> float:
        """Run the largest batch the runner forms on as many sessions at once as it will use (the main session
        and, with more workers, the busy one), so that onnxruntime's memory arenas grow to their peak now, while
        the old model still serves, instead of creeping up under load for hours (bench/faults.py soak: +22 % RSS
        in 10 min without it, flat with it) or running out of memory in a burst. Returns seconds spent."""
        import threading

        t0 = time.perf_counter()
        frame = np.full((max(1, batch_size), self.input_size, self.input_size, 3), 100, np.uint8)
        errors: list[BaseException] = []

        def run(busy: bool) -> None:
            try:
                self.model.predict(frame, busy=busy)
            except BaseException as exc:  # noqa: BLE001 - reported below, in the loading thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i > 0,)) for i in range(max(1, concurrent))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise ModelRejectedError(f"model {self.version}: warm-up at batch {batch_size} failed: {errors[0]}")
        return time.perf_counter() - t0

    def warm_up(self, runs: int = 3, shapes: Sequence[tuple[int, int]] = ()) -> float:
        """Run a few inferences so the first real part does not pay for allocation; returns seconds spent."""
        t0 = time.perf_counter()
        sizes = [(self.input_size, self.input_size), *shapes]
        for h, w in sizes:
            frame = np.full((h, w, 3), 100, np.uint8)
            for _ in range(runs):
                self.predict([frame])
        return time.perf_counter() - t0


def spinning_options(spinning: str) -> dict[str, bool]:
    """RunnerConfig.spinning ("always" | "within_run" | "never") as OnnxModel's keyword arguments."""
    return {"allow_spinning": spinning != "never", "spin_between_runs": spinning == "always"}


def load_inferencer(
    registry_root: str | Path,
    version: str,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    model_file: str = "model.onnx",
    smoke_runs: int = 1,
    warmup_runs: int = 3,
    warmup_shapes: Sequence[tuple[int, int]] = (),
    spinning: str = "within_run",
    busy_threads: int | None = None,
    peak_batch: int = 0,
    peak_concurrency: int = 1,
    product: str | None = None,
) -> Inferencer:
    """Load `version` of `product` (None: the registry folder's default product) from the registry, verify
    (sha256 + smoke inference) and warm it. Never returns a model that failed a check: raises ModelRejectedError
    (or the registry's IntegrityError/RegistryError, e.g. for a version of another product)."""
    from inspection.onnx_infer import OnnxModel
    from inspection.registry import Registry

    t0 = time.perf_counter()
    mv = Registry(registry_root, product=product).get(version)  # verifies every file's sha256 against the card
    path = Path(mv.dir) / model_file if model_file != "model.onnx" else Path(mv.model_path)
    if not path.is_file():
        raise ModelRejectedError(f"version {version} has no {path.name}; files: {sorted(mv.card.files)}")
    expected = mv.card.files.get(path.name)
    if expected is None:
        raise ModelRejectedError(f"version {version}: {path.name} has no sha256 in its model card")
    # OnnxModel tries each preferred provider with a real session + inference and keeps the first that runs
    model = OnnxModel(
        path,
        providers=list(providers) if providers else None,
        threads=threads,
        expected_sha256=expected,
        busy_threads=busy_threads,
        **spinning_options(spinning),
    )
    inf = Inferencer(model, mv.version, mv.card, path)
    bad = [t for t in inf.type_names if not re.match(DEFECT_TYPE_PATTERN, t)]
    if bad:  # they go into the decision store, MQTT and OPC UA as they are
        raise ModelRejectedError(
            f"version {version}: defect types {bad} are not names like 'crack' ({DEFECT_TYPE_PATTERN})"
        )
    if mv.card.defect_types and not inf.type_names:
        logger.warning("version %s: its card names defect types but the model has no type output", version)
    inf.smoke_test(smoke_runs)
    ref_path = Path(mv.dir) / REFERENCE_FILE
    if ref_path.is_file():
        try:
            reference = json.loads(ref_path.read_text()).get(path.name)
        except (OSError, ValueError) as exc:
            raise ModelRejectedError(f"version {version}: {REFERENCE_FILE} cannot be read: {exc}") from None
        if reference is not None:
            worst = inf.check_reference(reference)
            logger.info("model %s matches its export's smoke reference (max |Δ| %.1e)", version, worst)
    warm_s = inf.warm_up(warmup_runs, warmup_shapes)
    if peak_batch > 1:  # the runner's largest micro-batch, on as many sessions at once as its workers use
        warm_s += inf.warm_up_peak(peak_batch, peak_concurrency)
    logger.info(
        "model %s loaded from %s on %s (threads %s): verified and warm in %.2f s (warm-up %.2f s)",
        inf.version,
        path.name,
        inf.provider,
        threads or "all",
        time.perf_counter() - t0,
        warm_s,
    )
    return inf
