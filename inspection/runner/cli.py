"""`inspection runner serve|inspect`: serve verdicts on the line, or inspect a few files once (no torch)."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import logging
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from inspection.config import load_config
from inspection.errors import ConfigError, ImageValidationError
from inspection.images import decode_image
from inspection.runner.config import RunnerConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="serve HTTP (and folder mode / MQTT when configured)")
    inspect = sub.add_parser("inspect", help="inspect image files once and print one JSON line per file")
    for p in (serve, inspect):
        p.add_argument("--registry", type=Path, help="model registry root (serves its production alias)")
        p.add_argument("--station", help="station id (MQTT topic, default station of requests)")
        p.add_argument("--product", help="product of requests that name none (default: the registry's 'default')")
        p.add_argument("--config", type=Path, help="runner YAML (see configs/runner.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    serve.add_argument(
        "--products", metavar="A,B", help="serve these products side by side (each its own model and hot swap)"
    )
    serve.add_argument(
        "--station-product",
        action="append",
        default=[],
        metavar="STATION=PRODUCT",
        help="fix a station's product (its requests, OPC UA object, folder mode); repeatable",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--watch", type=Path, help="camera drop folder to watch (folder mode)")
    serve.add_argument("--store", help="decision store: directory, .sqlite file or database URL")
    serve.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish verdicts to this MQTT broker")
    serve.add_argument("--opcua", metavar="opc.tcp://HOST:PORT", help="serve OPC UA for the PLC (off by default)")
    serve.add_argument(
        "--opcua-insecure", action="store_true", help="LAB ONLY: also SecurityPolicy None and anonymous sessions"
    )
    serve.add_argument("--opcua-users", type=Path, metavar="FILE", help="OPC UA users file (name:argon2-hash lines)")
    serve.add_argument(
        "--opcua-image-root",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder Inspect(part_id, image_path) may read from (repeatable)",
    )
    user = sub.add_parser("opcua-user", help="add or replace an OPC UA user (argon2 hash) in a users file")
    user.add_argument("name")
    user.add_argument("--users-file", type=Path, required=True, metavar="FILE")
    user.add_argument("--password-stdin", action="store_true", help="read the password from stdin (no prompt)")
    inspect.add_argument("files", nargs="+", type=Path)


def build_config(args: argparse.Namespace) -> RunnerConfig:
    overrides = list(args.set)
    if args.registry is not None:
        overrides.append(f"registry={args.registry}")
    if args.station:
        overrides.append(f"station={args.station}")
    if args.product:
        overrides.append(f"product={args.product}")
    if getattr(args, "products", None):
        names = [json.dumps(p.strip()) for p in args.products.split(",") if p.strip()]
        overrides.append(f"products=[{', '.join(names)}]")
    if getattr(args, "host", None):
        overrides.append(f"http.host={args.host}")
    if getattr(args, "port", None):
        overrides.append(f"http.port={args.port}")
    if getattr(args, "watch", None):
        overrides.append(f"folder.watch={args.watch}")
    if getattr(args, "store", None):
        overrides.append(f"store={args.store}")
    if getattr(args, "mqtt", None):
        host, _, port = args.mqtt.partition(":")
        overrides.append(f"mqtt.host={host}")
        if port:
            overrides.append(f"mqtt.port={port}")
    if getattr(args, "opcua", None):
        overrides.append(f"opcua.endpoint={args.opcua}")
    if getattr(args, "opcua_insecure", False):
        overrides.append("opcua.insecure=true")
    if getattr(args, "opcua_users", None):
        overrides.append(f"opcua.users_file={args.opcua_users}")
    if getattr(args, "opcua_image_root", None):
        overrides.append(f"opcua.image_roots=[{', '.join(json.dumps(str(p)) for p in args.opcua_image_root)}]")
    config = load_config(RunnerConfig, args.config, overrides)
    fixed = {}
    for item in getattr(args, "station_product", None) or []:
        station, sep, product = item.partition("=")
        if not sep or not station or not product:
            raise ConfigError(f"--station-product {item!r} must look like STATION=PRODUCT (e.g. cell-3=tile)")
        fixed[station] = product
    if fixed:  # merged into the config file's mapping, then checked as a whole
        config = replace(config, station_products={**config.station_products, **fixed})
        config.validate()
    if config.registry is None:
        raise ConfigError("no model registry: pass --registry DIR or set registry in the config")
    return config


def _inspect_files(config: RunnerConfig, files: list[Path]) -> int:
    from inspection.registry import Registry
    from inspection.runner.inferencer import load_inferencer
    from inspection.schemas import InspectionResult, Verdict
    from inspection.thresholds import verdict_for

    product = config.product_for_station(config.station) or config.served_products[0]
    version = Registry(config.registry, product=product).alias(config.alias)
    if version is None:
        raise ConfigError(f"registry {config.registry} has no {config.alias!r} alias for product {product!r}")
    inf = load_inferencer(
        config.registry,
        version,
        config.providers,
        config.threads,
        config.model_file,
        warmup_runs=1,
        product=product,
    )
    held = 0
    for path in files:
        t0 = time.perf_counter()
        data = path.read_bytes() if path.is_file() else b""
        common = {
            "request_id": uuid.uuid4().hex,
            "part_id": path.stem,
            "station": config.station,
            "timestamp": datetime.now(UTC),
            "image_sha256": hashlib.sha256(data).hexdigest() if data else None,
            "product": product,
        }
        try:
            pred = inf.predict([decode_image(data, config.image_limits)])[0]
        except ImageValidationError as exc:
            held += 1
            result = InspectionResult(
                **common,
                verdict=Verdict.review,
                latency_ms=(time.perf_counter() - t0) * 1000,
                reason=f"{exc.reason}: {exc.detail}",
            )
        else:
            verdict = verdict_for(pred.score, pred.thresholds)
            flagged = verdict != Verdict.pass_  # a type is named for a flagged part only, as on the line
            result = InspectionResult(
                **common,
                verdict=verdict,
                defect_type=pred.defect_type if flagged else None,
                defect_type_probability=pred.defect_type_probability if flagged else None,
                defect_score=pred.score,
                thresholds=pred.thresholds,
                model_version=pred.version,
                latency_ms=(time.perf_counter() - t0) * 1000,
            )
        print(result.model_dump_json())  # machine-readable output of the command
    if held:
        logger.warning("%d of %d files held for review (bad image)", held, len(files))
    return 0


def _opcua_user(args: argparse.Namespace) -> int:
    from inspection.runner.opcua.security import write_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for OPC UA user {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ")
    write_user(args.users_file, args.name, password)
    logger.info("OPC UA user %s written to %s (mode 0600)", args.name, args.users_file)
    return 0


def main(args: argparse.Namespace) -> int:
    if args.action == "opcua-user":
        return _opcua_user(args)
    config = build_config(args)
    if args.action == "inspect":
        return _inspect_files(config, args.files)
    from inspection.runner.service import run_runner

    run_runner(config)
    return 0


if __name__ == "__main__":  # pragma: no cover
    _parser = argparse.ArgumentParser(prog="inspection runner")
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
