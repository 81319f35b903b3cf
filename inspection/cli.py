"""The `inspection` command. Each subcommand's module is imported only when that subcommand runs, so
`inspection runner ...` on a line-side box never loads torch.

A subcommand module provides `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from inspection import __version__
from inspection.errors import InspectionError

logger = logging.getLogger(__name__)

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("inspection.synth_cli", "render built-in demo parts (castings or --part tile) into def_front/ok_front"),
    "ingest": ("inspection.ingest.cli", "validate, deduplicate, group and split camera images into a manifest"),
    "schemas": ("inspection.schemas_cli", "export or check the JSON data contracts in data_schemas/"),
    "train": ("inspection.train.cli", "fine-tune the pretrained CNN (head | partial | full) into a run directory"),
    "evaluate": ("inspection.train.evaluate_cli", "evaluate a run as QA sees it: escapes, false rejects, plots"),
    "export": ("inspection.export.cli", "export a run to a self-contained ONNX model with parity check (and INT8)"),
    "registry": ("inspection.registry_cli", "list, show, register, promote and roll back model versions"),
    "runner": ("inspection.runner.cli", "serve verdicts on the line (HTTP, folder, MQTT)"),
    "review": ("inspection.review.cli", "the QA review web app and its users; export reviewed labels"),
    "adapt": ("inspection.adapt.cli", "adapt a run to a new camera/lighting domain without labels"),
    "gap": ("inspection.adapt.gap_cli", "domain-gap score between two image folders"),
    "demo": ("inspection.demo", "the end-to-end demo: synth -> flows -> runner -> summary"),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"inspection {__version__}: industrial visual inspection of cast parts",
        "",
        "usage: inspection [-v] COMMAND [options]   (inspection COMMAND --help for a command's options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def configure_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = 0
    while argv and argv[0] in ("-v", "-q", "--verbose", "--quiet"):
        verbose += 1 if argv.pop(0) in ("-v", "--verbose") else -1
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] == "--version":
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"inspection: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(
            f"inspection {name}: cannot import {module_name} ({exc}). "
            "Install the extra it needs, e.g. pip install '.[all]'",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"inspection {name}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    configure_logging(verbose)
    try:
        return int(module.main(args) or 0)
    except InspectionError as exc:
        logger.debug("failed", exc_info=True)
        print(f"inspection {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
