"""Target-domain image folders: listing, validated loading, and batches of network input.

Images are decoded with the same rules as everywhere else (`inspection.images`); a file that fails is
skipped with a warning and counted, never silently passed on. Each image is preprocessed on its own, so a
folder may mix camera resolutions exactly as the line would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from inspection.errors import DataError, ImageValidationError
from inspection.images import read_image

T = TypeVar("T")

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# folder name -> label, for labelled target folders (the def_front/ok_front layout of the source data)
LABEL_FOLDERS = {"def_front": "defect", "defect": "defect", "def": "defect", "ok_front": "ok", "ok": "ok"}


def list_images(folder: Path) -> list[Path]:
    """All image files under `folder` (recursively), sorted so runs are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder} (expected a directory of .jpg/.png/.bmp/.tiff files)")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images in {folder}: expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return paths


def list_labelled(folder: Path) -> tuple[list[Path], list[int]]:
    """Images and labels (1 = defect) from `folder/{def_front,ok_front}` (or defect/ok) subfolders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"labelled folder not found: {folder}")
    paths: list[Path] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = LABEL_FOLDERS.get(sub.name.lower())
        if label is None:
            continue
        found = list_images(sub)
        paths += found
        labels += [1 if label == "defect" else 0] * len(found)
    if not paths:
        raise DataError(f"no labelled images in {folder}: expected subfolders named {', '.join(sorted(LABEL_FOLDERS))}")
    if len(set(labels)) < 2:
        logger.warning("labelled target images in %s hold one class only; fine-tuning may bias the score", folder)
    return paths, labels


def subsample(paths: Sequence[T], n: int, seed: int) -> list[T]:
    """At most `n` of `paths` (or any items), chosen at random but reproducibly, in their original order."""
    if len(paths) <= n:
        return list(paths)
    idx = np.sort(np.random.default_rng(seed).choice(len(paths), size=n, replace=False))
    return [paths[i] for i in idx]


def run_source_images(samples: dict[str, list], n: int, seed: int) -> tuple[list[Path], list[str]]:
    """At most `n` of a run's training and validation photos that exist here, with the part (near-duplicate group)
    of each: the source domain for BN alignment and for the gap, whose noise floor halves the source by part."""
    present = [s for split in ("train", "val") for s in samples.get(split, []) if Path(s.path).is_file()]
    chosen = subsample(present, n, seed)
    return [Path(s.path) for s in chosen], [str(s.group_id) for s in chosen]


def load_valid(paths: Sequence[Path | np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Decode images (arrays pass through); returns the images and the indices that decoded."""
    images, kept = [], []
    for i, item in enumerate(paths):
        if isinstance(item, np.ndarray):
            images.append(item)
            kept.append(i)
            continue
        try:
            images.append(read_image(item))
            kept.append(i)
        except (ImageValidationError, OSError) as exc:
            logger.warning("skipping %s: %s", item, exc)
    return images, kept


def batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Indices 0..n-1 in nearly equal chunks: a per-batch average must not give a 1-image tail full weight."""
    if n == 0:
        return []
    return np.array_split(np.arange(n), max(1, -(-n // batch_size)))


def preprocess_images(net: torch.nn.Module, images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images of any sizes -> normalised network input (N, 3, S, S), one image at a time."""
    return torch.cat([net.preprocess(torch.from_numpy(np.ascontiguousarray(im))[None]) for im in images])


def iter_input_batches(
    net: torch.nn.Module, items: Sequence[Path | np.ndarray], batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices into `items` that decoded, network input batch) for each batch; bad files are skipped."""
    for idx in batches(len(items), batch_size):
        images, kept = load_valid([items[i] for i in idx])
        if images:
            yield idx[kept], preprocess_images(net, images)
