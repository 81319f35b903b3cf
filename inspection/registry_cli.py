"""`inspection registry`: list, show, init, register, promote, rollback and history of model versions, per product
(`--product P`; without it the registry folder's own product "default"), and `products`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from inspection.config import load_config
from inspection.registry import CONFIG_NAME, DEFAULT_PRODUCT, Registry, RegistryConfig, list_products

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path("registry"), help="registry folder (default ./registry)")
    parser.add_argument(
        "--product",
        default=None,
        help=f"product (part type) whose versions, aliases and golden set to use (default: {DEFAULT_PRODUCT!r}, "
        "the registry folder's own)",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="versions, with the aliases that point at them")
    sub.add_parser("products", help="the products of the registry, with their production version")
    show = sub.add_parser("show", help="a version's model card and golden-set figures")
    show.add_argument("version")
    init = sub.add_parser("init", help="create the registry and freeze its golden set")
    init.add_argument("--golden-set", required=True, help="ingest store/manifest or def_front/ok_front folder")
    init.add_argument(
        "--parts",
        type=float,
        default=None,
        help="share of each label's parts frozen as the golden set (default: the config's golden_parts, 0.15)",
    )
    init.add_argument("--split", default=None, help="take this store split as the golden set instead of sampling parts")
    init.add_argument("--config", type=Path, help="registry YAML with the gate limits")
    reg = sub.add_parser("register", help="register an export folder as a new immutable version")
    reg.add_argument("export_dir", type=Path)
    promote = sub.add_parser("promote", help="gate a version against production and promote it")
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="override a refused gate (needs --reason)")
    promote.add_argument("--reason", default="", help="why; recorded in the history")
    rollback = sub.add_parser("rollback", help="production <- previous, in one command")
    rollback.add_argument("--reason", default="", help="why; recorded in the history")
    sub.add_parser("history", help="every change, oldest first (JSON lines)")


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.action == "init":
        config = load_config(RegistryConfig, args.config) if args.config else RegistryConfig()
        config = replace(config, golden_set=str(Path(args.golden_set).resolve()))
        if args.split:
            config = replace(config, golden_split=args.split)
        if args.parts is not None:
            config = replace(config, golden_parts=args.parts)
        config.validate()
        reg = Registry.init(args.root, config, product=args.product)
        logger.info("registry %s, product %s ready (%s)", args.root, reg.product, reg.home / CONFIG_NAME)
        return 0
    if args.action == "products":
        for product in list_products(args.root):
            production = Registry(args.root, product=product).alias("production")
            out.write(f"{product}\t{production or '-'}\n")
        return 0
    reg = Registry(args.root, product=args.product)
    if args.action == "list":
        aliases = reg.aliases()
        for version in reg.versions():
            tags = [name for name, v in aliases.items() if v == version]
            card = reg.get(version).card
            out.write(f"{version}\t{card.mode}\treject≥{card.thresholds.reject:.4f}\t{','.join(tags)}\n")
        return 0
    if args.action == "show":
        card = reg.get(args.version).card
        data = json.loads(card.model_dump_json())
        try:
            from dataclasses import asdict

            data["golden"] = asdict(reg.golden_figures(args.version))
        except Exception as exc:  # no golden set yet: show the card anyway
            data["golden"] = f"unavailable: {exc}"
        out.write(json.dumps(data, indent=2) + "\n")
        return 0
    if args.action == "register":
        out.write(reg.register(args.export_dir) + "\n")
        return 0
    if args.action == "promote":
        report = reg.promote(args.version, reason=args.reason, force=args.force)
        out.write(json.dumps(report.to_dict(), indent=2) + "\n")
        return 0 if report.promoted else 3  # 3: refused by the gate (not an error of the command)
    if args.action == "rollback":
        out.write(reg.rollback(reason=args.reason) + "\n")
        return 0
    for entry in reg.history():
        out.write(json.dumps(entry) + "\n")
    return 0
