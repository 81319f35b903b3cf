"""The one preprocessing config of a backbone's weights.

Everything that turns a camera image into the network's input is described here once. Training, evaluation
and export build their torch module from it (`inspection.models.preprocess.Preprocessor`), and the exported
ONNX graph contains that module, so the runner only decodes bytes to uint8 RGB and never resizes or normalises.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: int = 224  # square network input; the weights were trained at 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # TF-Lite convention of EfficientNet-Lite weights
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: Literal["bilinear"] = (
        "bilinear"  # resize from camera size to input_size, no crop: parts fill the frame
    )
    channels: Literal["RGB"] = "RGB"  # grey cameras are replicated to 3 channels at decode time

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(
            input_size=int(data["input_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=data.get("interpolation", "bilinear"),
            channels=data.get("channels", "RGB"),
        )


# Preprocessing that travels with each known set of weights (as timm's pretrained_cfg does).
WEIGHTS_PREPROCESS: dict[str, PreprocessConfig] = {
    "tf_efficientnet_lite0": PreprocessConfig(input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "tf_efficientnet_lite1": PreprocessConfig(input_size=240, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "tf_efficientnet_lite2": PreprocessConfig(input_size=260, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

IMAGENET_PREPROCESS = PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def preprocess_for(backbone: str, input_size: int | None = None) -> PreprocessConfig:
    """Preprocessing of `backbone`'s weights; other timm backbones default to ImageNet statistics."""
    base = WEIGHTS_PREPROCESS.get(backbone, IMAGENET_PREPROCESS)
    if input_size is not None and input_size != base.input_size:
        base = PreprocessConfig(input_size=input_size, mean=base.mean, std=base.std)
    return base
