"""`inspection gap SOURCE TARGET [--run RUN_DIR]`: the domain-gap score between two image folders, as JSON.

Features come from the run's backbone (`--run`), or else from the packaged ImageNet EfficientNet-Lite0.
SOURCE may also be a run directory: its training and validation photos are the source, and because the run knows
which photos show the same part, the warning level is calibrated on halves holding different parts (a folder of
loose photos can only be halved at random, which understates the spread when each part is photographed many times).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from inspection.adapt.config import GapConfig
from inspection.config import load_config
from inspection.errors import DataError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder of images of the domain the model knows, or a run directory")
    parser.add_argument("target", help="folder of images of the new domain")
    parser.add_argument("--run", help="run directory whose backbone gives the features (default: ImageNet Lite0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="GapConfig overrides, e.g. warn_factor=4")


def main(args: argparse.Namespace) -> int:
    from inspection.adapt.data import list_images, run_source_images, subsample
    from inspection.adapt.gap import image_gap
    from inspection.models import build_net
    from inspection.train.run_dir import load_run

    config = load_config(GapConfig, None, args.overrides)
    source_run = load_run(args.source) if (Path(args.source) / "samples.json").is_file() else None
    feature_run = source_run  # a run given as SOURCE also gives the features, unless --run names another
    if args.run and (source_run is None or Path(args.run).resolve() != source_run.run_dir.resolve()):
        feature_run = load_run(args.run)
    groups: list[str] | None = None
    if source_run is not None:
        source, groups = run_source_images(source_run.samples, config.max_images * 2, config.seed)
        if len(source) < 8:
            raise DataError(f"{args.source}: only {len(source)} of its training images exist on this machine")
    else:
        source = subsample(list_images(args.source), config.max_images * 2, config.seed)
    target = subsample(list_images(args.target), config.max_images, config.seed)
    net = feature_run.net if feature_run is not None else build_net()
    result = image_gap(net, source, target, config, batch_size=args.batch_size, source_groups=groups)
    if result.warning:
        logger.warning(result.message)
    out = result.to_dict()
    features = str(feature_run.run_dir) if feature_run is not None else "imagenet tf_efficientnet_lite0"
    out.update(source=str(args.source), target=str(args.target), features=features)
    print(json.dumps(out, indent=2))
    return 0
