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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W)
        size = self.config.input_size
        x = F.interpolate(x, size=(size, size), mode=self.config.interpolation, align_corners=False, antialias=False)
        return x * self.scale + self.shift  # (N, 3, S, S)
