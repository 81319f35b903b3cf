"""`inspection review serve|user|export|demo-data`: the QA review web app, its users, and reviewed labels."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import logging
import sys

from inspection.config import load_config
from inspection.errors import InspectionError
from inspection.review.config import ROLES, ReviewConfig

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="decision store: folder, .sqlite file or SQLAlchemy URL (overrides the config)")
    parser.add_argument("--media-dir", help="folder of kept images/heatmaps (default: the store's folder)")
    parser.add_argument("--config", help="YAML file with a ReviewConfig (e.g. configs/review.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run the review web app")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config: 8600)")
    serve.add_argument(
        "--ingest-store",
        help="ingest store (folder with manifest.sqlite): its parts labelled both ways get their own queue",
    )
    serve.add_argument(
        "--registry",
        help="model registry folder: the part page offers each model version's defect types from its card",
    )

    user = sub.add_parser("user", help="manage review users (add, list, disable, enable, passwd, role)")
    user_sub = user.add_subparsers(dest="user_action", required=True)
    add = user_sub.add_parser("add", help="create a user (password from a prompt or --password-stdin)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="reviewer")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    _common(add)
    for name, help_ in (("disable", "disable a user and end their sessions"), ("enable", "enable a user again")):
        p = user_sub.add_parser(name, help=help_)
        p.add_argument("name")
        _common(p)
    passwd = user_sub.add_parser("passwd", help="set a user's password (ends their sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")
    _common(passwd)
    role = user_sub.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    _common(role)
    _common(user_sub.add_parser("list", help="list users as JSON lines"))

    export = sub.add_parser("export", help="write reviewed parts as a labelled def_front/ok_front folder")
    _common(export)
    export.add_argument("--out", required=True, help="folder to write (new, empty, or a previous export)")

    demo = sub.add_parser("demo-data", help="fill a store with synthetic flagged parts to try the app")
    _common(demo)
    demo.add_argument("--n", type=int, default=24, help="number of flagged parts")
    demo.add_argument("--n-pass", type=int, default=24, help="number of passed parts (for the statistics)")
    demo.add_argument("--seed", type=int, default=0)


def _config(args: argparse.Namespace) -> ReviewConfig:
    config = load_config(ReviewConfig, args.config, args.set)
    changes = {}
    if args.store:
        changes["store"] = args.store
    if args.media_dir:
        changes["media_dir"] = args.media_dir
    for key in ("host", "port", "ingest_store", "registry"):
        if getattr(args, key, None) is not None:
            changes[key] = getattr(args, key)
    config = dataclasses.replace(config, **changes)
    config.validate()
    if not config.store:
        raise InspectionError("no decision store given: pass --store DB_OR_DIR (or set store: in --config)")
    return config


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise InspectionError("--password-stdin: stdin gave an empty password")
        return password
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise InspectionError("the two passwords differ; nothing was changed")
    return first


def _auth(config: ReviewConfig):
    from inspection.review.auth import Auth
    from inspection.review.queries import open_store

    store = open_store(config.store, config.media_dir)
    return Auth(
        store.engine,
        min_password_length=config.min_password_length,
        password_time_cost=config.password_time_cost,
        password_memory_kib=config.password_memory_kib,
    )


def main(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.action == "serve":
        import uvicorn

        from inspection.review.app import create_app

        logger.info(
            "review app on http://%s:%d (store %s%s)",
            config.host,
            config.port,
            config.store,
            f", label conflicts of {config.ingest_store}" if config.ingest_store else "",
        )
        uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
        return 0
    if args.action == "user":
        from inspection.review.auth import AuthError

        auth = _auth(config)
        try:
            if args.user_action == "add":
                auth.add_user(args.name, _read_password(args), args.role)
            elif args.user_action == "passwd":
                auth.set_password(args.name, _read_password(args))
            elif args.user_action in ("disable", "enable"):
                auth.set_active(args.name, args.user_action == "enable")
            elif args.user_action == "role":
                auth.set_role(args.name, args.role)
            elif args.user_action == "list":
                for user in auth.list_users():
                    print(json.dumps(user, default=str))
        except AuthError as exc:
            raise InspectionError(str(exc)) from None
        return 0
    if args.action == "export":
        from pathlib import Path

        from inspection.review.export import run_review_export

        result = run_review_export(config, Path(args.out))
        print(
            json.dumps(
                {"out": str(result.out), "defect": result.n_defect, "ok": result.n_ok, "missing": len(result.missing)}
            )
        )
        return 0
    if args.action == "demo-data":
        from inspection.review.demo import seed_store
        from inspection.review.queries import open_store

        made = seed_store(open_store(config.store, config.media_dir), n=args.n, seed=args.seed, n_pass=args.n_pass)
        print(json.dumps({"parts": len(made), "flagged": sum(p.verdict != "pass" for p in made)}))
        return 0
    raise InspectionError(f"unknown action {args.action!r}")
