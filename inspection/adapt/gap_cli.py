"""`inspection gap SOURCE TARGET [--run RUN_DIR]`: the domain-gap score between two image folders, as JSON.

Features come from the run's backbone (`--run`), or else from the packaged ImageNet EfficientNet-Lite0.
"""

from __future__ import annotations

import argparse
import json
import logging

from inspection.adapt.config import GapConfig
from inspection.config import load_config

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="folder of images of the domain the model knows")
    parser.add_argument("target", help="folder of images of the new domain")
    parser.add_argument("--run", help="run directory whose backbone gives the features (default: ImageNet Lite0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="GapConfig overrides, e.g. warn_factor=4")


def main(args: argparse.Namespace) -> int:
    from inspection.adapt.data import list_images, subsample
    from inspection.adapt.gap import image_gap

    config = load_config(GapConfig, None, args.overrides)
    if args.run:
        from inspection.train.run_dir import load_run

        net = load_run(args.run).net
    else:
        from inspection.models import build_net

        net = build_net()
    source = subsample(list_images(args.source), config.max_images * 2, config.seed)
    target = subsample(list_images(args.target), config.max_images, config.seed)
    result = image_gap(net, source, target, config, batch_size=args.batch_size)
    if result.warning:
        logger.warning(result.message)
    out = result.to_dict()
    out.update(source=str(args.source), target=str(args.target), features=args.run or "imagenet tf_efficientnet_lite0")
    print(json.dumps(out, indent=2))
    return 0
