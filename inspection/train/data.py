"""Training data: samples from the ingest manifest, split checks, uint8 image loaders and augmentations.

The loader yields uint8 (N, H, W, 3) tensors at the camera's size; resizing and normalisation happen inside the
network (`inspection.models.preprocess.Preprocessor`), so there is one source of truth for preprocessing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from inspection.errors import DataError
from inspection.images import read_image
from inspection.preprocess import PreprocessConfig, letterbox_image, preprocess_for
from inspection.train.config import AugmentConfig, TrainConfig

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # otherwise every import asks the registry for a version

logger = logging.getLogger(__name__)

LABEL_TO_TARGET = {"ok": 0, "defect": 1}
SPLITS = ("train", "val", "test")


def sample_class() -> type:
    """The ingest stage's `Sample` dataclass (path, sha256, label, split, group_id)."""
    from inspection.ingest.manifest import Sample

    return Sample


def make_sample(path: str | Path, sha256: str, label: str | None, split: str | None, group_id: str) -> Any:
    return sample_class()(path=Path(path), sha256=sha256, label=label, split=split, group_id=group_id)


def resolve_samples(data: Path | str | Sequence[Any], work_dir: Path) -> list[Any]:
    """`data` is a store folder, a manifest file, a raw def_front/ok_front folder, or already a list of samples."""
    if isinstance(data, list | tuple):
        return list(data)
    path = Path(data)
    if not path.exists():
        raise DataError(f"data not found: {path} (expected a store folder, a manifest file or an image folder)")
    from inspection.ingest import samples_from

    return list(samples_from(path, work_dir))


def split_samples(samples: Sequence[Any], max_per_class: int | None = None, seed: int = 0) -> dict[str, list[Any]]:
    """Labelled samples per split; fail clearly when a split is empty or holds one class only."""
    by_split: dict[str, list[Any]] = {s: [] for s in SPLITS}
    for s in samples:
        if s.label is None or s.split is None:
            continue
        if s.label not in LABEL_TO_TARGET:
            raise DataError(f"sample {s.path}: label {s.label!r}, allowed: {', '.join(LABEL_TO_TARGET)}")
        if s.split not in by_split:
            raise DataError(f"sample {s.path}: split {s.split!r}, allowed: {', '.join(SPLITS)}")
        by_split[s.split].append(s)
    for name in ("train", "val"):
        items = by_split[name]
        if not items:
            raise DataError(
                f"the {name} split is empty ({len(samples)} samples in all, {sum(map(len, by_split.values()))} "
                "labelled with a split); training needs labelled train and val parts"
            )
        classes = Counter(s.label for s in items)
        if len(classes) < 2:
            only = next(iter(classes))
            raise DataError(
                f"the {name} split holds one class only ({len(items)} x {only!r}); need both 'ok' and 'defect' parts"
            )
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        kept = []
        for label in LABEL_TO_TARGET:
            items = sorted((s for s in by_split["train"] if s.label == label), key=lambda s: s.sha256)
            idx = rng.permutation(len(items))[:max_per_class]
            kept += [items[i] for i in sorted(idx)]
        by_split["train"] = kept
    return by_split


def targets_of(samples: Sequence[Any]) -> np.ndarray:
    return np.array([LABEL_TO_TARGET[s.label] for s in samples], dtype=np.int64)


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) from the file header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def common_size(samples: Sequence[Any], limit: int = 2000) -> tuple[int, int]:
    """Most common (H, W) in the data: images of another size are resized to it in the loader, so batches stack."""
    step = max(1, len(samples) // limit)  # headers are cheap, but a sample of 2000 is plenty
    counts = Counter(image_size(Path(s.path)) for s in list(samples)[::step])
    return counts.most_common(1)[0][0]


def loader_preprocess(config: TrainConfig) -> PreprocessConfig:
    """The preprocessing `build_net_for(config)` gives the network, without building it (for the loaders)."""
    return preprocess_for(config.backbone, config.input_size, config.resize)


def loader_size(samples: Sequence[Any], preprocess: PreprocessConfig | None = None) -> tuple[int, int]:
    """(H, W) the loader brings every image to: the most common size (squash), or the network's square input
    (letterbox: a non-square canvas would rescale photos squarer than it differently from serving)."""
    if preprocess is not None and preprocess.resize == "letterbox":
        return preprocess.input_size, preprocess.input_size
    return common_size(samples)


def data_fingerprint(samples: Sequence[Any]) -> str:
    """sha256 over the sorted training image hashes and labels: what a model was trained on."""
    h = hashlib.sha256()
    for sha, label in sorted((s.sha256, s.label) for s in samples):
        h.update(f"{sha}:{label}\n".encode())
    return h.hexdigest()


def build_augment(config: AugmentConfig, seed: int = 0) -> Any | None:
    """An albumentations pipeline on uint8 RGB images, or None when disabled (seeded: Compose has its own RNG)."""
    if not config.enabled:
        return None
    import albumentations as A
    import cv2

    blur = config.blur_limit if config.blur_limit % 2 == 1 else config.blur_limit + 1
    return A.Compose(
        [
            # reflect the border: a black wedge in a corner would be a shortcut feature for "rotated"
            A.Rotate(limit=config.rotate_limit, border_mode=cv2.BORDER_REFLECT_101, p=config.rotate_p),
            A.HorizontalFlip(p=config.hflip_p),
            A.VerticalFlip(p=config.vflip_p),
            A.RandomBrightnessContrast(
                brightness_limit=config.brightness_limit,
                contrast_limit=config.contrast_limit,
                p=config.brightness_contrast_p,
            ),
            A.RandomGamma(gamma_limit=config.gamma_limit, p=config.gamma_p),
            A.OneOf([A.GaussianBlur(blur_limit=(3, blur)), A.MotionBlur(blur_limit=(3, blur))], p=config.blur_p),
            A.GaussNoise(std_range=config.noise_std_range, p=config.noise_p),
        ],
        seed=seed,
    )


@dataclass
class ImageDataset(Dataset):
    """uint8 (H, W, 3) images at one size, with 0/1 targets (defect = 1)."""

    samples: Sequence[Any]
    size_hw: tuple[int, int]
    augment: Any | None = None
    preprocess: PreprocessConfig | None = None  # the network's; letterbox: pad like it does, never squash

    def __post_init__(self) -> None:
        if self.letterbox and self.size_hw[0] != self.size_hw[1]:
            raise DataError(
                f"a letterbox loader needs a square size (the network's input, see loader_size), got {self.size_hw}"
            )

    @property
    def letterbox(self) -> bool:
        return self.preprocess is not None and self.preprocess.resize == "letterbox"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> np.ndarray:
        import cv2

        img = read_image(Path(self.samples[i].path))
        if self.letterbox:
            return img  # letterboxed in __getitem__, after augmentation (a 90-degree turn changes the aspect)
        if img.shape[:2] != tuple(self.size_hw):
            img = cv2.resize(img, (self.size_hw[1], self.size_hw[0]), interpolation=cv2.INTER_AREA)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.load(i)
        if self.augment is not None:
            img = self.augment(image=img)["image"]
        if self.letterbox:
            assert self.preprocess is not None
            img = letterbox_image(img, self.size_hw[0], self.preprocess.fill_rgb)  # what the ONNX graph does
        label = self.samples[i].label
        return torch.from_numpy(np.ascontiguousarray(img)), LABEL_TO_TARGET[label] if label is not None else -1


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


def make_loader(
    samples: Sequence[Any],
    size_hw: tuple[int, int],
    config: TrainConfig,
    train: bool,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    """Train loaders shuffle (or sample class-balanced) and augment; evaluation loaders do neither."""
    augment = build_augment(config.augment, config.seed) if train else None
    dataset = ImageDataset(samples, size_hw, augment, loader_preprocess(config))
    sampler = None
    shuffle = train
    if train and config.balance == "sampler":
        sampler = balanced_sampler(targets_of(samples), generator)
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=config.num_workers,
        generator=generator,
        worker_init_fn=_seed_worker,
        drop_last=train and len(samples) > (batch_size or config.batch_size),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.num_workers > 0,
    )


def balanced_sampler(targets: np.ndarray, generator: torch.Generator | None = None) -> WeightedRandomSampler:
    """Each class drawn equally often: the minority class is seen as often as the majority."""
    counts = np.bincount(targets, minlength=2).astype(np.float64)
    weights = 1.0 / counts[targets]
    return WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(targets), generator=generator)


def pos_weight_for(targets: np.ndarray) -> float:
    """BCE pos_weight = #ok / #defect, so both classes weigh the same in the loss."""
    counts = np.bincount(targets, minlength=2)
    return float(counts[0]) / float(max(counts[1], 1))
