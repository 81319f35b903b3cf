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
    from inspection.adapt.data import list_images, subsample
    from inspection.adapt.gap import image_gap

    config = load_config(GapConfig, None, args.overrides)
    source_run = (Path(args.source) / "samples.json").is_file()
    run = None
    if args.run or source_run:
        from inspection.train.run_dir import load_run

        run = load_run(args.run or args.source)
        net = run.net
    else:
        from inspection.models import build_net

        net = build_net()
    groups: list[str] | None = None
    if source_run:
        known = run if args.run is None else load_run(args.source)
        samples = [s for split in ("train", "val") for s in known.samples.get(split, []) if Path(s.path).is_file()]
        if len(samples) < 8:
            raise DataError(f"{args.source}: only {len(samples)} of its training images exist on this machine")
        samples = subsample(samples, config.max_images * 2, config.seed)
        source: list[Path] = [Path(s.path) for s in samples]
        groups = [str(s.group_id) for s in samples]
    else:
        source = subsample(list_images(args.source), config.max_images * 2, config.seed)
    target = subsample(list_images(args.target), config.max_images, config.seed)
    result = image_gap(net, source, target, config, batch_size=args.batch_size, source_groups=groups)
    if result.warning:
        logger.warning(result.message)
    out = result.to_dict()
    features = str(args.run or args.source) if run is not None else "imagenet tf_efficientnet_lite0"
    out.update(source=str(args.source), target=str(args.target), features=features)
    print(json.dumps(out, indent=2))
    return 0
