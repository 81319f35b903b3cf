"""`inspection demo`: the whole pipeline on one machine, start to finish, and a summary a plant engineer reads.

demo castings (`--part tile`: demo ferrite tiles; or `--data` real photos) -> Prefect `retrain` flow (ingest ->
train -> export_and_register -> deploy) -> the line-side runner in its own process -> a stream of parts the model
never saw, sent over HTTP -> verdicts checked against the known truth -> summary (JSON in `OUT/summary.json`, a
table on the terminal). Every process it starts is stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inspection.errors import DataError, InspectionError

logger = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MARKER = ".inspection-demo"  # only a folder carrying this marker is wiped and rebuilt
PARTS = ("impeller", "tile")
# each part's training recipe: tiles are non-square, so their network letterboxes (keeps the aspect)
TRAIN_CONFIGS = {"impeller": REPO_CONFIGS / "demo.yaml", "tile": REPO_CONFIGS / "demo_tile.yaml"}


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("demo_out")  # everything the demo writes (store, runs, registry, decisions)
    data: Path | None = None  # a def_front/ok_front folder of real photos; None: render demo parts
    part: str = "impeller"  # the demo part: impeller castings, or flat tiles (inspection.synth_tile)
    n_parts: int = 480  # demo photos to learn from: "a few hundred labelled parts" (tiles: n / tile_shots tiles)
    tile_shots: int = 3  # photos of each demo tile (turned, mirrored, re-lit), so grouping by part matters
    n_stream: int = 160  # unseen parts sent to the runner (one photo each); with --data: the registry's golden set
    max_stream: int = 400  # with --data, at most this many held-out photos are sent (keeps the demo short)
    seed: int = 7
    mode: str | None = None  # transfer-learning mode of the demo's training run (None: the train config's)
    train_config: Path | None = None  # None: the part's (TRAIN_CONFIGS)
    registry_config: Path = REPO_CONFIGS / "demo_registry.yaml"  # looser first-model limits: a 3-minute model
    clients: int = 4  # concurrent HTTP clients, like several stations' gateways
    token: str = "demo-token"  # bearer token of the demo runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            raise DataError(f"{out} exists and was not made by the demo; choose another --out or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `inspection demo`; safe to delete\n")


def _stream_items(config: DemoConfig, registry: Path) -> list[tuple[Path, str]]:
    """(image path, true label) of parts the model never saw: new demo castings, or the golden parts of real
    photos (sampled whole at registry init and kept out of training)."""
    if config.data is None:
        unseen = config.out / "unseen"
        _render(config, unseen, config.n_stream, seed=config.seed + 1000, shots=1)  # a line sees each part once
        return [(p, "defect") for p in sorted((unseen / "def_front").iterdir())] + [
            (p, "ok") for p in sorted((unseen / "ok_front").iterdir())
        ]
    golden_file = registry / "golden.json"
    golden = json.loads(golden_file.read_text()) if golden_file.is_file() else []
    if not golden:
        raise DataError(f"the registry {registry} has no golden set to stream")
    rng = np.random.default_rng(config.seed)
    idx = rng.permutation(len(golden))[: config.max_stream]
    return [(Path(golden[i]["path"]), str(golden[i]["label"])) for i in sorted(idx)]


def _render(config: DemoConfig, out: Path, n_photos: int, seed: int, shots: int) -> None:
    """`n_photos` photos of the demo part into out/def_front and out/ok_front (tiles: `shots` per tile)."""
    if config.part == "tile":
        from inspection.synth_tile import render_tile_dataset

        render_tile_dataset(out, -(-n_photos // shots), seed=seed, shots=shots)
    else:
        from inspection.synth import render_dataset

        render_dataset(out, n_photos, seed=seed)


def _start_runner(config: DemoConfig, registry: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, INSPECTION_RUNNER_TOKEN=config.token)
    log = open(config.out / "runner.log", "wb")  # noqa: SIM115 - lives as long as the process
    cmd = [
        sys.executable,
        "-m",
        "inspection.cli",
        "runner",
        "serve",
        "--registry",
        str(registry),
        "--station",
        "demo-station",
        "--port",
        str(port),
        "--store",
        str(config.out / "decisions"),
    ]
    logger.info("starting the runner: %s", " ".join(cmd))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_ready(proc: subprocess.Popen, base: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InspectionError(f"the runner exited with code {proc.returncode}; see its log")
        try:
            if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise InspectionError(f"the runner was not ready within {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _send_stream(base: str, token: str, items: list[tuple[Path, str]], clients: int) -> list[dict[str, Any]]:
    import httpx

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}

    def send(item: tuple[int, tuple[Path, str]]) -> dict[str, Any]:
        i, (path, truth) = item
        body = path.read_bytes()
        t0 = time.perf_counter()
        r = client.post(f"{base}/v1/inspect", params={"part_id": f"part-{i:05d}"}, content=body, headers=headers)
        rtt = (time.perf_counter() - t0) * 1000.0
        answer = r.json()
        return {"truth": truth, "status": r.status_code, "rtt_ms": rtt, **answer}

    with httpx.Client(timeout=30.0) as client, ThreadPoolExecutor(clients) as pool:
        return list(pool.map(send, enumerate(items)))


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Verdict counts and the two errors that matter on a line: escapes (defect passed) and false rejects."""
    verdicts = [r.get("verdict", "none") for r in results]
    truth = [r["truth"] for r in results]
    n_def = sum(t == "defect" for t in truth)
    n_ok = len(truth) - n_def
    escapes = sum(t == "defect" and v == "pass" for t, v in zip(truth, verdicts, strict=True))
    false_rejects = sum(t == "ok" and v == "reject" for t, v in zip(truth, verdicts, strict=True))
    reviews_ok = sum(t == "ok" and v == "review" for t, v in zip(truth, verdicts, strict=True))
    rtt = np.array([r["rtt_ms"] for r in results]) if results else np.zeros(1)
    server = np.array([r.get("latency_ms", np.nan) for r in results], dtype=float) if results else np.zeros(1)
    versions = sorted({str(r.get("model_version")) for r in results})
    return {
        "parts_inspected": len(results),
        "http_errors": sum(r["status"] != 200 for r in results),
        "verdicts": {v: verdicts.count(v) for v in ("pass", "review", "reject")},
        "defective_parts": n_def,
        "good_parts": n_ok,
        "escapes": escapes,
        "escape_rate": escapes / n_def if n_def else 0.0,
        "false_rejects": false_rejects,
        "false_reject_rate": false_rejects / n_ok if n_ok else 0.0,
        "good_parts_sent_to_review": reviews_ok,
        "latency_ms_client_p50": float(np.percentile(rtt, 50)),
        "latency_ms_client_p99": float(np.percentile(rtt, 99)),
        "latency_ms_server_p50": float(np.nanpercentile(server, 50)),
        "latency_ms_server_p99": float(np.nanpercentile(server, 99)),
        "model_versions": versions,
    }


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from flows.retrain_flow import retrain_flow

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per part would bury the summary

    if config.part not in PARTS:
        raise DataError(f"part {config.part!r}; allowed: {', '.join(PARTS)}")
    t0 = time.perf_counter()
    out = config.out
    _prepare_out(out)
    if config.data is None:
        source = out / ("tiles" if config.part == "tile" else "castings")
        _render(config, source, config.n_parts, seed=config.seed, shots=config.tile_shots)
    else:
        source = Path(config.data)
        if not source.is_dir():
            raise DataError(f"--data {source} is not a folder (expected def_front/ and ok_front/ inside)")
    store, registry = out / "store", out / "registry"
    flow_result = retrain_flow(
        sources=[str(source)],
        store=str(store),
        runs_dir=str(out / "runs"),
        registry=str(registry),
        mode=config.mode,
        train_config=str(config.train_config or TRAIN_CONFIGS[config.part]),
        registry_config=str(config.registry_config),
    )
    if not flow_result["promoted"]:
        reason = (flow_result.get("gate") or {}).get("reason")
        raise InspectionError(f"the gate refused the demo model {flow_result['version']}: {reason}; nothing to serve")
    t_pipeline = time.perf_counter() - t0
    items = _stream_items(config, registry)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_runner(config, registry, port)
    try:
        _wait_ready(proc, base)
        results = _send_stream(base, config.token, items, config.clients)
    finally:
        _stop(proc)
    summary = summarise(results)
    summary.update(
        {
            "model_version": flow_result.get("version"),
            "promoted": flow_result.get("promoted"),
            "gate": flow_result.get("gate"),
            "pipeline_seconds": round(t_pipeline, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "flagged_parts_store": str((out / "decisions").resolve()),
            "flagged_images": str((out / "decisions" / "images").resolve()),
            "review_app": f"inspection review serve --store {out / 'decisions'}",
            "data": str(source),
            "part": config.part if config.data is None else None,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="folder of real photos (def_front/ok_front); default: demo castings")
    parser.add_argument(
        "--part",
        choices=PARTS,
        default=DemoConfig.part,
        help="demo part: impeller castings (default) or flat tiles (non-square, several photos per tile)",
    )
    parser.add_argument("--out", type=Path, default=DemoConfig.out, help="output folder (default demo_out)")
    parser.add_argument("--n", type=int, default=DemoConfig.n_parts, help="demo photos to train on")
    parser.add_argument("--stream", type=int, default=DemoConfig.n_stream, help="unseen parts sent to the runner")
    parser.add_argument("--mode", choices=["head", "partial", "full"], default=DemoConfig.mode)
    parser.add_argument(
        "--train-config", type=Path, default=None, help="default: configs/demo.yaml (tiles: configs/demo_tile.yaml)"
    )
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)


def _print_table(s: dict[str, Any]) -> None:
    v = s["verdicts"]
    lines = [
        "",
        "inspection demo — summary",
        f"  model version        {s['model_version']} (promoted: {s['promoted']}; part: {s.get('part') or 'real'})",
        f"  parts inspected      {s['parts_inspected']} ({s['defective_parts']} defective, {s['good_parts']} good)",
        f"  verdicts             pass {v['pass']}, review {v['review']}, reject {v['reject']}",
        f"  escapes              {s['escapes']} defective parts passed ({s['escape_rate']:.2%})",
        f"  false rejects        {s['false_rejects']} good parts rejected ({s['false_reject_rate']:.2%}); "
        f"{s['good_parts_sent_to_review']} good parts sent to review",
        f"  latency (HTTP, ms)   p50 {s['latency_ms_client_p50']:.1f}, p99 {s['latency_ms_client_p99']:.1f} "
        f"(server p50 {s['latency_ms_server_p50']:.1f}, p99 {s['latency_ms_server_p99']:.1f})",
        f"  flagged parts        {s['flagged_images']}",
        f"  review them          {s['review_app']}",
        f"  time                 {s['total_seconds']:.0f} s (pipeline {s['pipeline_seconds']:.0f} s)",
        "",
    ]
    sys.stdout.write("\n".join(lines))


def main(args: argparse.Namespace) -> int:
    config = DemoConfig(
        out=args.out,
        data=args.data,
        part=args.part,
        n_parts=args.n,
        n_stream=args.stream,
        seed=args.seed,
        mode=args.mode,
        train_config=args.train_config,
    )
    summary = run_demo(config)
    _print_table(summary)
    return 0 if summary["http_errors"] == 0 else 1
