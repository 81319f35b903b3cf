"""Torch implementation of `inspection.preprocess.PreprocessConfig`, used by training, evaluation and export.

Because the exported ONNX graph is traced from this module, serving cannot drift from training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inspection.preprocess import PreprocessConfig


class Preprocessor(nn.Module):
    """uint8 (N, H, W, 3) RGB, any H and W -> float (N, 3, S, S) normalised network input."""

    def __init__(self, config: PreprocessConfig):
        super().__init__()
        self.config = config
        mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
        # fold /255, -mean and /std into one multiply-add
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        fill = torch.tensor(config.fill_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("fill", fill, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W)
        if self.config.resize == "letterbox":
            x = self.pad_to_square(x)  # (N, 3, M, M), M = max(H, W)
        size = self.config.input_size
        x = F.interpolate(x, size=(size, size), mode=self.config.interpolation, align_corners=False, antialias=False)
        return x * self.scale + self.shift  # (N, 3, S, S)

    def pad_to_square(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 3, M, M), the frame centred on `fill` (same arithmetic as `square_padding`).

        Padding before the resize (not after) keeps the pads plain shape arithmetic and the resize target fixed,
        which the dynamo exporter lowers with symbolic H and W; every pixel is then scaled by exactly S / M."""
        h, w = x.shape[2], x.shape[3]
        side = torch.sym_max(h, w)  # symbolic under export: no guard on which side is longer
        top, left = (side - h) // 2, (side - w) // 2
        # F.pad takes one scalar: pad the offset from the per-channel fill with 0, then add the fill back
        return F.pad(x - self.fill, (left, side - w - left, top, side - h - top)) + self.fill
