"""The inspection network: preprocessing -> pretrained CNN -> linear defect head with a class-activation map.

The head is one linear layer on globally average-pooled features. Besides the last conv features it may read
the pooled outputs of earlier backbone stages (`taps`): mid-level texture features that tell a pinhole from a
casting's grain far better than the ImageNet-level top alone (grouped CV on the real photos: ROC-AUC 0.9982
with the top only, 0.9993 with stages 2-6 tapped). Because every input of the head is an average-pooled map,
applying its weights at every position of each map gives a class-activation map per stage; their sum, brought to
one grid at 1/16 of the input (19x19 for 300 px), gives the heatmap (`evidence_map`); the mean of each stage's map
is exactly its part of the logit, so the heatmap costs nothing extra and is consistent with the score.

`pooling="lse"` (a multiple-instance head) reads that map the other way round: the logit is the log-sum-exp of the
heatmap grid's cell logits (temperature r; r -> 0 is the mean, large r the maximum), so a defect needs to raise
the evidence somewhere rather than on average. A small pit on a large textured tile moves the mean of a 14x14
grid by 1/196 of its local evidence; the log-sum-exp lets it decide (synthetic tiles, grouped CV: ROC-AUC 0.89 ->
0.94). The heatmap then shows exactly the cells the score is made of.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from inspection.models.backbone import LITE0, create_backbone
from inspection.models.preprocess import Preprocessor
from inspection.preprocess import PreprocessConfig, preprocess_for

logger = logging.getLogger(__name__)

CLASS_NAMES = ("ok", "defect")  # the defect probability is the score; "defect" is the positive class
CAM_STRIDE = 16  # heatmap grid: 1/16 of the network input (19x19 at 300 px, 14x14 at 224)
POOLINGS = ("mean", "lse")


def stage_channels(backbone: nn.Module) -> list[int]:
    """Output channels of each stage of `backbone.blocks` (EfficientNet/MobileNet-style timm backbones)."""
    out = []
    for stage in backbone.blocks:
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        out.append(int(convs[-1].out_channels))
    return out


class InspectionNet(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        preprocess: PreprocessConfig,
        dropout: float = 0.2,
        taps: Sequence[int] = (),
        type_names: Sequence[str] = (),
        pooling: str = "mean",
        temperature: float = 1.0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: got {pooling!r}, allowed: {', '.join(POOLINGS)}")
        if not temperature > 0:
            raise ValueError(f"temperature: got {temperature}, allowed > 0")
        self.pooling, self.temperature = pooling, float(temperature)
        self.preprocess = Preprocessor(preprocess)
        self.backbone = backbone
        self.taps = tuple(sorted(int(t) for t in taps))
        if self.taps:
            n_stages = len(backbone.blocks)
            bad = [t for t in self.taps if not 0 <= t < n_stages]
            if bad:
                raise ValueError(f"taps {bad} are not stages of this backbone (0..{n_stages - 1})")
        channels = stage_channels(backbone) if self.taps else []
        self.widths = tuple([channels[t] for t in self.taps] + [num_features])  # head input, per map
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(sum(self.widths), 1)  # defect logit
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        # defect types (when the labels name them): a softmax over the types on the same pooled features; the
        # verdict stays with the defect head, the type says which defect a flagged part most likely carries
        self.type_names = tuple(type_names)
        self.type_head = nn.Linear(sum(self.widths), len(self.type_names)) if self.type_names else None

    # ---------------------------------------------------------------------------------------------- features
    def feature_maps_all(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised input (N, 3, S, S) -> [tapped stage maps..., last conv features], each (N, C, h, w)."""
        if not self.taps:
            return [self.backbone.forward_features(x)]
        bb = self.backbone
        x = bb.bn1(bb.conv_stem(x))
        maps = []
        for i, stage in enumerate(bb.blocks):
            x = stage(x)
            if i in self.taps:
                maps.append(x)
        maps.append(bb.bn2(bb.conv_head(x)))
        return maps

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (N, 3, S, S) -> last conv features (N, C, h, w)."""
        return self.backbone.forward_features(x)

    def pooled_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> the head's input (N, sum(widths)): every map average-pooled, concatenated."""
        return self.pooled_of(self.feature_maps_all(x))

    def pooled_of(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Maps -> their means (N, sum(widths)), what the defect-type head reads. With `pooling="lse"` the means of
        the grid the head scores (the same up to the grid's resampling), so types fitted on cached grid rows see
        exactly what serving computes."""
        if self.pooling == "lse":
            return self.grid_of(maps).mean(dim=(2, 3))
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=1)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> pooled features (N, D); what `head` mode caches."""
        return self.pooled_from_input(self.preprocess(images))

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(pooled)).squeeze(1)  # (N,)

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, H, W, 3) -> defect logits (N,). Used for training."""
        return self.logits_from_input(self.preprocess(images))

    def logits_from_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> defect logits (N,), pooled as the head is (mean or log-sum-exp)."""
        return self.logits_from_maps(self.feature_maps_all(x))

    def logits_from_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if self.pooling == "lse":
            return self.logits_from_grid(self.grid_of(maps))
        return self.logits_from_pooled(self.pooled_of(maps))

    # ---------------------------------------------------------------------------- the multiple-instance head
    def grid_features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> every map brought to the heatmap grid and concatenated: (N, sum(widths), g, g); what
        `head` mode caches for `pooling="lse"` (the head is linear, so resampling features or their logits
        commutes: the cells' logits are the heatmap's)."""
        return self.grid_of(self.feature_maps_all(self.preprocess(images)))

    def grid_of(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Maps (N, C_i, h_i, w_i) -> one grid (N, sum(C_i), g, g)."""
        return torch.cat([self.to_grid(m) for m in maps], dim=1)

    def logits_from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, sum(widths), g, g) grid features -> defect logits (N,) by log-sum-exp over the cells."""
        cells = F.conv2d(self.dropout(grid), self.head.weight[:, :, None, None], self.head.bias)[:, 0]
        return self.pool_cells(cells)

    def pool_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """(N, g, g) cell logits -> (N,), by `lse_pool` at the head's temperature."""
        return lse_pool(cells.flatten(1), self.temperature)

    def to_grid(self, fmap: torch.Tensor) -> torch.Tensor:
        size = self.cam_size()
        if fmap.shape[-1] > size:  # finer than the grid: average, which keeps the mean
            return F.adaptive_avg_pool2d(fmap, size)
        if fmap.shape[-1] < size:
            return F.interpolate(fmap, size=(size, size), mode="bilinear", align_corners=False)
        return fmap

    # ---------------------------------------------------------------------------------------------- serving
    def cam_size(self) -> int:
        return max(1, math.ceil(self.preprocess.config.input_size / CAM_STRIDE))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 images (N, H, W, 3) -> (defect probability (N,), heatmap (N, h, w) in [0, 1]) and, for a model
        with defect types, their probabilities (N, T) as a third output."""
        maps = self.feature_maps_all(self.preprocess(images))
        prob, heatmap = self._score_and_map(maps)
        if self.type_head is None:
            return prob, heatmap
        return prob, heatmap, torch.softmax(self.type_head(self.pooled_of(maps)), dim=1)

    def _score_and_map(self, maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.split(self.head.weight, list(self.widths), dim=1)
        logit = self.head.bias.expand(maps[0].shape[0])
        if len(maps) == 1 and self.pooling == "mean":
            # the head as a 1x1 convolution: the same numbers, and onnxruntime runs it 8x faster than an Einsum
            cam = F.conv2d(maps[0], weights[0][:, :, None, None], self.head.bias)[:, 0]  # (N, h, w) logits
            return torch.sigmoid(cam.mean(dim=(1, 2))), torch.sigmoid(cam)  # mean == head(avgpool) by linearity
        cam = None
        for fmap, w in zip(maps, weights, strict=True):
            part = F.conv2d(fmap, w[:, :, None, None])  # (N, 1, h, w): this stage's share of the logit per position
            logit = logit + part.mean(dim=(1, 2, 3))
            part = self.to_grid(part)  # linear like the head: the grid of the logits == the logits of the grid
            cam = part if cam is None else cam + part
        if self.pooling == "lse":
            cells = cam[:, 0] + self.head.bias[:, None, None]  # type: ignore[index]
            prob = torch.sigmoid(self.pool_cells(cells))
            return prob, evidence_map(cells, prob)
        prob = torch.sigmoid(logit)
        return prob, evidence_map(cam[:, 0], prob)  # type: ignore[index]


def lse_pool(cells: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, G) cell logits -> (N,): log-sum-exp at temperature r, offset so a uniform map gives its value."""
    return (torch.logsumexp(temperature * cells, dim=1) - math.log(cells.shape[1])) / temperature


def evidence_map(cam: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """(N, h, w) summed class-activation map -> heatmap in [0, 1]: where the evidence for a defect stands above the
    image's own average, scaled to its peak and weighted by the defect probability, so a good part's map stays
    faint and a defect's peaks at 1 on its strongest evidence.

    Why not sigmoid(cam): across tapped stages the map's local logits span tens of units (the part's edges against
    the table, the cavity against the flange), so the sigmoid saturates to 0 or 1 over whole regions and says
    nothing; the shape of the map, not its level, is what points at a defect (argmax unchanged)."""
    flat = cam.flatten(1)
    z = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + 1e-6)
    z = torch.relu(z)
    z = z / (z.amax(dim=1, keepdim=True) + 1e-6)
    return (z * prob[:, None]).view_as(cam)


def build_net(
    backbone: str = LITE0,
    pretrained: bool = True,
    weights: str | Path | None = None,
    input_size: int | None = None,
    dropout: float = 0.2,
    taps: Sequence[int] = (),
    resize: Literal["squash", "letterbox"] = "squash",
    type_names: Sequence[str] = (),
    pooling: str = "mean",
    temperature: float = 1.0,
) -> InspectionNet:
    """Create the network by backbone name; the preprocessing travels with the backbone's weights."""
    body = create_backbone(backbone, weights=weights, pretrained=pretrained)
    num_features = int(body.num_features)
    preprocess = preprocess_for(backbone, input_size, resize)
    return InspectionNet(
        body,
        num_features,
        preprocess,
        dropout=dropout,
        taps=taps,
        type_names=type_names,
        pooling=pooling,
        temperature=temperature,
    )
