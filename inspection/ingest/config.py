"""Configuration of the ingest stage (frozen; loadable from YAML plus key=value overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from inspection.errors import ConfigError
from inspection.images import ImageLimits
from inspection.ingest.labels import parse_label


@dataclass(frozen=True)
class IngestConfig:
    # folder name -> label; the real drop folders are named like this (any other folder: unlabelled);
    # "defect:<type>" also names the defect type (crack: "defect:crack"), so the model learns the types
    label_map: dict[str, str] = field(default_factory=lambda: {"def_front": "defect", "ok_front": "ok"})
    # train/val/test share of images; 15 % each for val/test keeps ~1,000 real photos per evaluation split
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # the split must not change between runs: the seed fixes which groups go where
    seed: int = 0
    # 32 px: smaller than this cannot show a casting defect
    min_side: int = 32
    # longest side of any line camera we support
    max_side: int = 8192
    # decompression-bomb guard, checked on the header before decoding
    max_pixels: int = 40_000_000
    # refuse absurd files before reading them whole
    max_bytes: int = 50_000_000
    # near-duplicate candidates: cosine distance of the rotation/flip-invariant descriptors, among the
    # `near_dup_neighbours` nearest; loose on purpose, the verification below decides
    near_dup_max_distance: float = 0.02
    near_dup_neighbours: int = 24
    # same part when the aligned signatures correlate at least this much (and, for two groups, the median of
    # their members' cross scores). Real photos rotated/mirrored/zoomed/shifted and re-JPEGed: 99 % score
    # ≥ 0.86; pairs of different real parts: 99 % ≤ 0.69 (see inspection/ingest/dedup.py, bench/ingest.py)
    near_dup_min_similarity: float = 0.8
    # the general method (parts without a round cavity, e.g. flat tiles; inspection/ingest/dedup_general.py): the
    # same neighbours within this cosine distance of its symmetry-invariant descriptors (re-shots of one demo tile:
    # ≤ 0.57), then the same part when the outline-aligned textures correlate at least this much (re-shots ≥ 0.73,
    # different tiles ≤ 0.32; 960 photos of 320 demo tiles, of one size or of varied sizes)
    near_dup_general_max_distance: float = 0.7
    near_dup_general_min_similarity: float = 0.5
    # decode+hash threads (0 = one per CPU core); OpenCV and hashlib release the GIL
    workers: int = 0
    # file names to skip without a record (editor/OS droppings, never camera images)
    ignore_names: tuple[str, ...] = (".DS_Store", "Thumbs.db", "desktop.ini")
    # show a tqdm bar (only when stderr is a terminal)
    progress: bool = True

    def validate(self) -> None:
        problems = []
        for folder, value in self.label_map.items():
            try:
                parse_label(value)
            except ValueError as exc:
                problems.append(f"{folder}: {exc}")
        if problems:
            raise ConfigError(f"label_map: {'; '.join(problems)}")
        fr = self.split_fractions
        if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(
                f"split_fractions: got {fr}; need three non-negative numbers (train, val, test) summing to 1"
            )
        if self.min_side < 1 or self.max_side < self.min_side:
            raise ConfigError(f"min_side/max_side: got {self.min_side}/{self.max_side}; need 1 ≤ min_side ≤ max_side")
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ConfigError(f"max_pixels/max_bytes must be positive, got {self.max_pixels}/{self.max_bytes}")
        if not 0.0 <= self.near_dup_max_distance <= 2.0 or self.near_dup_neighbours < 0:
            raise ConfigError(
                f"near_dup_max_distance/near_dup_neighbours: got {self.near_dup_max_distance}/"
                f"{self.near_dup_neighbours}; allowed: 0 ≤ distance ≤ 2, neighbours ≥ 0 (0 = no grouping)"
            )
        for name in ("near_dup_min_similarity", "near_dup_general_min_similarity"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: got {getattr(self, name)}; allowed: -1 … 1")
        if not 0.0 <= self.near_dup_general_max_distance <= 2.0:
            raise ConfigError(f"near_dup_general_max_distance: got {self.near_dup_general_max_distance}; allowed 0 … 2")
        if self.workers < 0:
            raise ConfigError(f"workers: got {self.workers}; allowed: 0 (one per core) or a positive count")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(
            min_side=self.min_side, max_side=self.max_side, max_pixels=self.max_pixels, max_bytes=self.max_bytes
        )
