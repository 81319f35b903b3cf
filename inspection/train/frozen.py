"""The frozen part of the network, run once per image: pooled features (head mode) or trunk activations
(cached partial mode), cached in memory and optionally on disk by image sha256.

On the CPU the frozen part is exported to ONNX and run in onnxruntime, which runs EfficientNet-Lite0 several
times faster than PyTorch eager on this kind of box (6,633 photos at 300 px: ~45 s instead of ~4.5 min); the
runner serves the same onnxruntime graph, so training sees the numbers the line will see. On CUDA (or when the
export fails) the pass stays in PyTorch. JPEG decoding of the next batch overlaps with the model call.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inspection.models import InspectionNet
from inspection.models.backbone import PACKAGED
from inspection.train.config import TrainConfig
from inspection.train.data import ImageDataset, loader_preprocess

logger = logging.getLogger(__name__)

BATCH = 32


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not (enabled and sys.stderr.isatty()))


class FeatureCache:
    """Rows of a frozen part on disk: one file per (backbone, input size, weights, image size, part, taps)."""

    def __init__(self, directory: str | Path | None, key: str | None):
        self.path = (
            Path(directory) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt" if directory and key else None
        )
        self.key = key
        self.table: dict[str, torch.Tensor] = {}
        if self.path is not None and self.path.is_file():
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored.get("key") == key:
                self.table = stored["features"]
        self.dirty = False

    def save(self) -> None:
        if self.path is not None and self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({"key": self.key, "features": self.table}, tmp)
            tmp.replace(self.path)
            self.dirty = False


def weights_tag(config: TrainConfig) -> str | None:
    """What the frozen backbone's weights are, for cache keys; None when they are random (not cacheable)."""
    if not config.pretrained:
        return None
    if config.weights is not None:
        return hashlib.sha256(Path(config.weights).read_bytes()).hexdigest()[:16]
    return "imagenet-packaged" if config.backbone in PACKAGED else None


# ------------------------------------------------------------------------------------------- the frozen parts
def split_point(net: InspectionNet, config: TrainConfig) -> int:
    """Index of the first trained stage in `backbone.blocks` (partial mode)."""
    return len(net.backbone.blocks) - config.trainable_blocks


@dataclass(frozen=True)
class TrunkLayout:
    """How a cached partial-mode row is laid out: the activation map at the split point (C, h, w), flattened,
    then the pooled outputs of the tapped stages before it (frozen, so cached too); for the multiple-instance
    head (`grid` cells per side) those taps on the heatmap grid instead, (C_taps, grid, grid) flattened."""

    k: int
    shape: tuple[int, int, int]
    n_pooled: int
    grid: int = 0  # 0: the frozen taps are pooled vectors

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        x, taps = rows[:, : c * h * w].reshape(-1, c, h, w), rows[:, c * h * w :]
        return x, (taps.reshape(len(rows), -1, self.grid, self.grid) if self.grid else taps)


def trunk_rows(net: InspectionNet, images: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 images -> [activations after the frozen stem and stages [0, k) flattened, pooled frozen taps]."""
    bb = net.backbone
    x = bb.bn1(bb.conv_stem(net.preprocess(images)))
    pooled = []
    for i, stage in enumerate(bb.blocks[:k]):
        x = stage(x)
        if i in net.taps:  # the multiple-instance head needs the frozen taps' cells, not their mean
            pooled.append(net.to_grid(x).flatten(1) if net.pooling == "lse" else x.mean(dim=(2, 3)))
    return torch.cat([x.flatten(1), *pooled], dim=1)


def trunk_activations(net: InspectionNet, images: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 images -> activations after the frozen stem and stages [0, k): (N, C, h, w)."""
    bb = net.backbone
    x = bb.bn1(bb.conv_stem(net.preprocess(images)))
    for stage in bb.blocks[:k]:
        x = stage(x)
    return x


def tail_logits(net: InspectionNet, x: torch.Tensor, k: int, frozen_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The rest of the network from stage k on, then the head: (N, C, h, w) [+ pooled frozen taps] -> logits (N,);
    for the multiple-instance head the frozen taps come as grids (N, C_taps, g, g)."""
    if net.pooling == "lse":
        maps = _tail_maps(net, x, k)
        frozen = [frozen_pooled] if frozen_pooled is not None and frozen_pooled.shape[1] else []
        return net.logits_from_grid(torch.cat([*frozen, net.grid_of(maps)], dim=1))
    return net.logits_from_pooled(tail_pooled(net, x, k, frozen_pooled))


def _tail_maps(net: InspectionNet, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The maps the head reads from stage k on: tapped stages >= k, then the last conv features."""
    bb = net.backbone
    maps = []
    for i, stage in enumerate(bb.blocks[k:], start=k):
        x = stage(x)
        if i in net.taps:
            maps.append(x)
    maps.append(bb.bn2(bb.conv_head(x)))
    return maps


def tail_pooled(net: InspectionNet, x: torch.Tensor, k: int, frozen_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The head's input from stage k on: (N, C, h, w) [+ pooled frozen taps] -> pooled features (N, D)."""
    pooled = [frozen_pooled] if frozen_pooled is not None and frozen_pooled.shape[1] else []
    if net.pooling == "lse":  # the frozen taps come as grids: the mean of the whole grid, as `pooled_of` takes it
        return torch.cat([*pooled, net.grid_of(_tail_maps(net, x, k))], dim=1).mean(dim=(2, 3))
    return torch.cat([*pooled, net.pooled_of(_tail_maps(net, x, k))], dim=1)


def trunk_layout(net: InspectionNet, k: int, size_hw: tuple[int, int]) -> TrunkLayout:
    with torch.no_grad():
        probe = trunk_activations(net.eval(), torch.zeros(1, *size_hw, 3, dtype=torch.uint8), k)
    n_pooled = sum(w for t, w in zip(net.taps, net.widths, strict=False) if t < k)
    grid = net.cam_size() if net.pooling == "lse" else 0
    return TrunkLayout(k, tuple(probe.shape[1:]), n_pooled * max(1, grid) ** 2, grid)  # type: ignore[arg-type]


class _Module(nn.Module):
    """A frozen part as a module with one uint8 input, for the ONNX export."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images)


# ------------------------------------------------------------------------------------------------- engines
class _TorchEngine:
    name = "torch"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, amp):
        self.fn, self.device, self.amp = fn, device, amp

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        with self.amp():
            return self.fn(torch.from_numpy(batch).to(self.device, non_blocking=True)).float().cpu()


class _OrtEngine:
    name = "onnxruntime"

    def __init__(self, session: Any):
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: batch})[0])


def _ort_engine(net: InspectionNet, fn, size_hw: tuple[int, int], threads: int) -> _OrtEngine:
    """Export `fn` (uint8 images -> rows) to a temporary ONNX file and open it in onnxruntime on the CPU."""
    import onnxruntime as ort
    from torch.export import Dim

    example = torch.zeros(2, *size_hw, 3, dtype=torch.uint8)  # batch 2: a batch of 1 would be specialised away
    with tempfile.TemporaryDirectory(prefix="inspection-frozen-") as tmp:
        path = Path(tmp) / "frozen.onnx"
        with torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                _Module(fn).eval(),
                (example,),
                input_names=["images"],
                dynamic_shapes={"images": {0: Dim("batch")}},
                external_data=False,
                dynamo=True,
                verbose=False,
            )
        program.save(str(path), external_data=False)
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _OrtEngine(session)


def make_engine(net: InspectionNet, fn, size_hw: tuple[int, int], device: torch.device, config: TrainConfig):
    """onnxruntime on the CPU (config.frozen_engine auto/onnxruntime), PyTorch otherwise or if the export fails."""
    from inspection.train.trainer import amp_context

    net.eval()
    torch_engine = _TorchEngine(fn, device, lambda: amp_context(device, config))
    wanted = config.frozen_engine
    if wanted == "torch" or (wanted == "auto" and device.type != "cpu"):
        return torch_engine
    t0 = time.perf_counter()
    try:
        engine = _ort_engine(net, fn, size_hw, config.threads)
    except Exception as exc:  # noqa: BLE001 - PyTorch computes the same numbers, only slower
        if wanted == "onnxruntime":
            raise
        logger.warning("frozen pass stays in PyTorch: the ONNX export failed (%s: %s)", type(exc).__name__, exc)
        return torch_engine
    logger.info("frozen part exported to onnxruntime in %.1f s", time.perf_counter() - t0)
    return engine


def _batches(
    samples: Sequence[Any], size_hw: tuple[int, int], augment: Any | None, config: TrainConfig
) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches; the next batch is decoded on a thread while the model runs on this one."""
    dataset = ImageDataset(samples, size_hw, augment, loader_preprocess(config))  # letterbox: pad, never squash

    def load(start: int) -> np.ndarray:
        return np.stack([dataset[i][0].numpy() for i in range(start, min(start + BATCH, len(samples)))])

    starts = list(range(0, len(samples), BATCH))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, starts[0]) if starts else None
        for j in range(len(starts)):
            batch = pending.result()  # type: ignore[union-attr]
            pending = pool.submit(load, starts[j + 1]) if j + 1 < len(starts) else None
            yield batch


def extract(
    engine: Callable[[np.ndarray], torch.Tensor],
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    config: TrainConfig,
    cache: FeatureCache | None = None,
    augment: Any | None = None,
    desc: str = "features",
    half: bool = False,
) -> torch.Tensor:
    """`engine(uint8 images)` per sample (rows (N, D)). Clean views (augment=None) are read from / added to
    `cache`, keyed by image sha256; augmented views are never cached (each run draws its own)."""
    use_cache = cache is not None and augment is None
    todo = [i for i, s in enumerate(samples) if s.sha256 not in cache.table] if use_cache else list(range(len(samples)))
    feats: dict[int, torch.Tensor] = {}
    if todo:
        subset = [samples[i] for i in todo]
        pos = 0
        n_batches = (len(subset) + BATCH - 1) // BATCH
        for batch in _progress(_batches(subset, size_hw, augment, config), n_batches, desc, config.progress):
            for row in engine(batch):
                feats[todo[pos]] = row.half() if half else row.clone()
                pos += 1
        if use_cache:
            for i, row in feats.items():
                cache.table[samples[i].sha256] = row  # type: ignore[union-attr]
            cache.dirty = True  # type: ignore[union-attr]
    rows = [feats[i] if i in feats else cache.table[samples[i].sha256] for i in range(len(samples))]  # type: ignore[union-attr]
    return torch.stack(rows) if rows else torch.zeros(0)


def random_d4(x: torch.Tensor, generator: torch.Generator | None, *more: torch.Tensor) -> torch.Tensor | tuple:
    """A random flip / quarter turn per batch of activation maps (N, C, h, w): cheap spatial augmentation. Maps
    in `more` (the frozen taps' grids of one batch) get the same turn, so their cells stay aligned."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(int(torch.randint(0, 2, (1,), generator=generator)))
    out = [torch.rot90(m, k, dims=(2, 3)) for m in (x, *more)]
    out = [torch.flip(m, dims=(3,)) for m in out] if flip else out
    return tuple(out) if more else out[0]


def _no_engine(batch: np.ndarray) -> torch.Tensor:
    raise AssertionError("every row is cached; the frozen part should not have run")


@dataclass
class FrozenFeatures:
    """The frozen part's rows for every sample (clean views) plus augmented training views, and how to use them."""

    rows: torch.Tensor  # (N, D): one clean row per sample, in the order of the samples given
    views: list[torch.Tensor]  # cached_views x (N, D) augmented rows of the same samples
    part: str  # "pooled" (head mode) or "trunk{k}" (cached partial)
    layout: TrunkLayout | None  # partial: how a row splits into the map and the frozen pooled taps
    engine: str
    seconds: float


def frozen_features(
    net: InspectionNet,
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    device: torch.device,
    config: TrainConfig,
    view_samples: Sequence[Any] | None = None,
) -> FrozenFeatures:
    """One frozen pass over `samples` (plus `cached_views` augmented passes over `view_samples`, default all)."""
    from inspection.train.data import build_augment

    head = config.mode == "head"
    if head and net.pooling == "lse":
        part, layout = f"grid{net.cam_size()}", None

        def fn(images: torch.Tensor) -> torch.Tensor:
            return net.grid_features(images).flatten(2)  # (N, C, g * g)

    elif head:
        part, layout = "pooled", None
        fn = net.pooled_features
    else:
        k = split_point(net, config)
        layout = trunk_layout(net, k, size_hw)
        part = f"trunk{k}" + (f"-grid{layout.grid}" if layout.grid else "")  # lse: the frozen taps as grids

        def fn(images: torch.Tensor) -> torch.Tensor:
            return trunk_rows(net, images, k)

    tag = weights_tag(config)
    taps = ",".join(map(str, net.taps))
    shape = f"{config.input_size}|{config.resize}|{size_hw[0]}x{size_hw[1]}"  # squash and letterbox differ
    key = f"{config.backbone}|{shape}|{tag}|{part}|taps={taps}" if tag else None
    disk = FeatureCache(config.feature_cache, key) if config.feature_cache and key else None
    memo = disk if disk is not None else FeatureCache(None, "memory")  # in-memory only: still one pass per image
    t0 = time.perf_counter()
    need = [s for s in samples if s.sha256 not in memo.table]
    engine = make_engine(net, fn, size_hw, device, config) if need or config.cached_views else None
    half = part.startswith("grid")  # a photo's grid is hundreds of cells x ~2,000 channels: half precision
    rows = extract(engine or _no_engine, samples, size_hw, config, memo, desc=part, half=half)
    augment = build_augment(config.augment, config.seed)
    views = []
    for view in range(config.cached_views if augment is not None and engine is not None else 0):
        views.append(
            extract(  # type: ignore[arg-type]
                engine, view_samples or samples, size_hw, config, augment=augment, desc=f"view {view + 1}", half=half
            )
        )
    if disk is not None:
        disk.save()
    seconds = time.perf_counter() - t0
    n_images = len(need) + len(views) * len(view_samples or samples)
    logger.info(
        "frozen part (%s) on %d images in %.1f s (%s)", part, n_images, seconds, engine.name if engine else "cache"
    )
    return FrozenFeatures(rows, views, part, layout, engine.name if engine else "cache", seconds)
