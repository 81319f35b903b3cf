"""Backbones (weights loading and renaming) and the inspection network (preprocessing + CNN + CAM head)."""

from inspection.models.backbone import create_backbone, load_lite0_imagenet_state_dict
from inspection.models.net import CLASS_NAMES, InspectionNet, build_net
from inspection.models.preprocess import Preprocessor

__all__ = [
    "CLASS_NAMES",
    "InspectionNet",
    "Preprocessor",
    "build_net",
    "create_backbone",
    "load_lite0_imagenet_state_dict",
]
