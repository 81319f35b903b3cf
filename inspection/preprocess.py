"""The one preprocessing config of a backbone's weights.

Everything that turns a camera image into the network's input is described here once. Training, evaluation
and export build their torch module from it (`inspection.models.preprocess.Preprocessor`), and the exported
ONNX graph contains that module, so the runner only decodes bytes to uint8 RGB and never resizes or normalises.

Two ways to bring a frame of any size to the square network input (`resize`):
- "squash" resizes H and W independently: the part fills the input, but a non-square photo is distorted (a
  round pit on a 120x630 tile becomes a 5:1 ellipse). Right for a fixed camera whose frames are square.
- "letterbox" keeps the aspect: the frame is padded to a square with `fill`, centred, then resized, so every
  pixel is scaled by the same S / max(H, W). Right for parts photographed at varied, non-square sizes.

`letterbox_image` is the NumPy twin of the torch module's letterbox, for the training loader (which must
batch frames of one size) and for tests; `content_box` says where the frame lies in the network input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np

RESIZE_MODES = ("squash", "letterbox")


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: int = 224  # square network input; the weights were trained at 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # TF-Lite convention of EfficientNet-Lite weights
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: Literal["bilinear"] = (
        "bilinear"  # resize from camera size to input_size, no crop: parts fill the frame
    )
    channels: Literal["RGB"] = "RGB"  # grey cameras are replicated to 3 channels at decode time
    # squash (the default of every config and model card from before this field) or letterbox (aspect kept)
    resize: Literal["squash", "letterbox"] = "squash"
    # letterbox padding, uint8 RGB. None = the normalisation mean rounded (128 for Lite0): after normalising
    # the pad is ~0, the "no signal" input the pretrained stem also assumes at its zero-padded borders, so the
    # pad adds no texture and no edge beyond the frame's own border; an integer so the loader pads identically.
    fill: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize: got {self.resize!r}, allowed: {', '.join(RESIZE_MODES)}")
        fill = self.fill if self.fill is not None else tuple(int(round(255 * m)) for m in self.mean)
        fill = tuple(int(v) for v in fill)
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            raise ValueError(f"fill: got {self.fill!r}, allowed three integers 0..255 (uint8 RGB)")
        object.__setattr__(self, "fill", fill)  # resolved once: the card then states the value used

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["fill"] = list(self.fill_rgb)
        return d

    @property
    def fill_rgb(self) -> tuple[int, int, int]:
        assert self.fill is not None  # resolved in __post_init__
        return self.fill

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        fill = data.get("fill")
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=data.get("interpolation", "bilinear"),
            channels=data.get("channels", "RGB"),
            resize=data.get("resize", "squash"),  # cards written before letterbox existed squashed
            fill=tuple(int(v) for v in fill) if fill is not None else None,  # type: ignore[arg-type]
        )


# Preprocessing that travels with each known set of weights (as timm's pretrained_cfg does).
WEIGHTS_PREPROCESS: dict[str, PreprocessConfig] = {
    "tf_efficientnet_lite0": PreprocessConfig(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "tf_efficientnet_lite1": PreprocessConfig(input_size=240, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "tf_efficientnet_lite2": PreprocessConfig(input_size=260, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

IMAGENET_PREPROCESS = PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def preprocess_for(
    backbone: str, input_size: int | None = None, resize: Literal["squash", "letterbox"] = "squash"
) -> PreprocessConfig:
    """Preprocessing of `backbone`'s weights; other timm backbones default to ImageNet statistics."""
    base = WEIGHTS_PREPROCESS.get(backbone, IMAGENET_PREPROCESS)
    return replace(base, input_size=input_size or base.input_size, resize=resize)


# ------------------------------------------------------------------------------------------------ letterbox
def square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixels that centre an H x W frame in a max(H, W) square.

    The torch module pads by the same integer arithmetic, so both sides put the frame on the same pixels."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return top, side - height - top, left, side - width - left


def letterbox_image(image: np.ndarray, side: int, fill: tuple[int, int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (side, side, 3): padded to a square with `fill`, then bilinearly resized.

    The same steps as `Preprocessor` for resize="letterbox" (pad, then bilinear with half-pixel centres and no
    antialiasing), so a loader that batches frames through it feeds the network what the ONNX graph computes
    from the raw frame, up to uint8 rounding."""
    import cv2

    top, bottom, left, right = square_padding(*image.shape[:2])
    square = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=tuple(map(int, fill)))
    if square.shape[0] == side:
        return square
    return cv2.resize(square, (side, side), interpolation=cv2.INTER_LINEAR)


def content_box(config: PreprocessConfig, height: int, width: int) -> tuple[float, float, float, float]:
    """Where an H x W frame lies in the network input, as fractions (top, left, bottom, right) of its side.

    (0, 0, 1, 1) for squash. A heatmap over the network input is cropped to this box before it is drawn over
    the photo (its grid covers the padding too)."""
    if config.resize == "squash":
        return 0.0, 0.0, 1.0, 1.0
    top, bottom, left, right = square_padding(height, width)
    side = float(max(height, width))
    return top / side, left / side, (top + height) / side, (left + width) / side
