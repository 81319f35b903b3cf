"""Benchmark: the line-side runner over HTTP vs a plain FastAPI + PyTorch-eager server, same model, same load.

    .venv/bin/python bench/runner.py [--run RUN_DIR] [--out bench_out/runner] [--images DIR]

Each server runs in its own process on a free loopback port (uvicorn, real sockets); the client sends the real
camera JPEG bytes (`Content-Type: image/jpeg`) and waits for the verdict:
  * sequential: one client, one request at a time -> latency p50 / p99 (ms);
  * concurrent: 8 clients in parallel for a fixed time -> parts/s.
Variants: runner FP32 (model.onnx), runner INT8 (model.int8.onnx, when the export kept it), plain PyTorch eager
FP32 (the same weights; eager PyTorch has no drop-in INT8 path for this network on CPU).
Model: `--run` (a run trained on the real images), else the newest run under bench_out/ with a checkpoint, else
the pretrained EfficientNet-Lite0 with a fresh head (latency does not depend on the head's weights) — the JSON
says which. Prints one JSON object and writes it to OUT/runner.json.

Internal modes (used by the benchmark itself): `serve-runner MODEL --port P`, `serve-torch RUN_OR_STATE --port P`.
"""

import argparse
import asyncio
import http.client
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
logger = logging.getLogger("bench.runner")
DEFAULT_IMAGES = Path(os.environ.get("INSPECTION_REAL_DATA", REPO.parent / "shared/data/casting/train"))


# -- servers (subprocesses) ------------------------------------------------------------------------------------


def serve_runner(
    model_path: Path, port: int, threads: int, providers: list[str], max_batch: int, workers: int | None = None
) -> None:
    import uvicorn

    from inspection.onnx_infer import OnnxModel
    from inspection.runner import RunnerConfig, Runtime, create_app
    from inspection.runner.config import AuthConfig, BatchingConfig
    from inspection.runner.inferencer import Inferencer, spinning_options

    store = tempfile.mkdtemp(prefix="bench-runner-store-")
    cfg = RunnerConfig(
        store=store,
        station="bench",
        threads=threads,
        auth=AuthConfig(required=False),
        # the runner's defaults otherwise (spinning, busy session)
        batching=BatchingConfig(max_batch_size=max_batch, workers=workers or BatchingConfig.workers),
    )
    rt = Runtime.build(cfg)
    model = OnnxModel(
        model_path,
        providers=providers,
        threads=threads,
        busy_threads=cfg.busy_threads,
        **spinning_options(cfg.spinning),
    )
    logger.info("runner serving %s on %s", model_path.name, model.provider)
    inf = Inferencer(model, model.card.version, model.card, model_path)
    inf.smoke_test()
    inf.warm_up(5, [(300, 300)])
    rt.holder.swap(inf)
    kwargs = {}
    try:
        import httptools  # noqa: F401

        kwargs["http"] = "httptools"
    except ImportError:
        pass
    uvicorn.run(create_app(cfg, rt), host="127.0.0.1", port=port, log_level="warning", access_log=False, **kwargs)


def serve_torch(source: Path, port: int, threads: int) -> None:
    """The plain way: FastAPI handler decodes with OpenCV and calls the PyTorch model eagerly."""
    import cv2
    import numpy as np
    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    # On this shared 2-core machine, 2 intra-op threads made eager inference ~50x slower (1.4 s vs 26 ms per
    # image: the OpenMP workers fight the other processes), so the baseline gets its best setting (--torch-threads).
    torch.set_num_threads(threads)
    if source.is_dir():
        from inspection.train import load_run

        run = load_run(source)
        net, thresholds = run.net, run.card.thresholds
    else:
        from inspection.models import build_net
        from inspection.schemas import Thresholds

        net = build_net(pretrained=False)
        net.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
        thresholds = Thresholds(reject=0.5, review=0.3)
    net.eval()
    app = FastAPI()

    @app.get("/readyz")
    async def ready():
        return {"ready": True}

    @app.post("/v1/inspect")
    async def inspect(request: Request):
        data = await request.body()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            return JSONResponse({"error": "bad image"}, status_code=422)
        x = torch.from_numpy(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))[None]
        with torch.inference_mode():
            prob, _ = net(x)
        score = float(prob[0])
        verdict = "reject" if score >= thresholds.reject else "review" if score >= thresholds.review else "pass"
        return {"verdict": verdict, "defect_score": score}

    with torch.inference_mode():
        for _ in range(5):
            net(torch.zeros((1, 300, 300, 3), dtype=torch.uint8))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- client ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def inspect(self, body: bytes, part: str) -> tuple[int, bytes]:
        self.conn.request("POST", f"/v1/inspect?part_id={part}", body=body, headers={"Content-Type": "image/jpeg"})
        resp = self.conn.getresponse()
        return resp.status, resp.read()


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server not ready in time")


def measure(port: int, images: list[bytes], n_seq: int, duration: float, clients: int) -> dict:
    c = Client(port)
    for i in range(20):  # warm the server's code paths and the connection
        c.inspect(images[i % len(images)], f"w{i}")
    lat = []
    codes: dict[int, int] = {}
    for i in range(n_seq):
        t0 = time.perf_counter()
        status, _ = c.inspect(images[i % len(images)], f"s{i}")
        lat.append((time.perf_counter() - t0) * 1000)
        codes[status] = codes.get(status, 0) + 1
    lat.sort()
    t_cpu = time.process_time()
    done, errors, elapsed = asyncio.run(_concurrent(port, images, clients, duration))
    client_cpu = time.process_time() - t_cpu
    return {
        "sequential": {
            "n": n_seq,
            "p50_ms": round(statistics.median(lat), 2),
            "p90_ms": round(lat[int(0.9 * (len(lat) - 1))], 2),
            "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2),
            "mean_ms": round(statistics.fmean(lat), 2),
            "status_codes": codes,
        },
        "concurrent": {
            "clients": clients,
            "seconds": round(elapsed, 2),
            "parts": done,
            "errors": errors,
            "parts_per_s": round(done / elapsed, 1),
            "client_cpu_s": round(client_cpu, 2),  # the load generator's own share of the 2 cores
        },
    }


async def _concurrent(port: int, images: list[bytes], clients: int, duration: float) -> tuple[int, int, float]:
    """`clients` keep-alive connections, each sending its next request as soon as the answer is in.

    One asyncio loop with pre-built requests: the load generator shares the 2 cores with the server, so it must
    cost as little CPU as possible (threads of http.client cost several times more per request).
    """
    done = errors = 0
    stop = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < stop:
            body = images[i % len(images)]
            head = (
                f"POST /v1/inspect?part_id=c{k}-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status_line.split(b" ", 2)[1] == b"200":
                done += 1
            else:
                errors += 1
            i += clients
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    return done, errors, time.perf_counter() - t0


def run_server(args_list: list[str], images, n_seq, duration, clients, threads, extra=()) -> dict:
    port = _free_port()
    cmd = [sys.executable, __file__, *args_list, "--port", str(port), "--threads", str(threads), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(port, proc)
        return measure(port, images, n_seq, duration, clients)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- model preparation -----------------------------------------------------------------------------------------


def _candidate_runs(explicit: Path | None) -> list[Path]:
    """Runs to try, best first: the one asked for, else runs under bench_out/ (newest first)."""
    if explicit is not None:
        return [explicit]
    runs = [p.parent for p in (REPO / "bench_out").rglob("checkpoint.pt") if (p.parent / "samples.json").is_file()]
    return sorted((r for r in runs if "runner" not in r.parts), key=lambda p: p.stat().st_mtime, reverse=True)


def prepare_model(runs: list[Path], out: Path, notes: list[str]) -> tuple[Path, str, Path]:
    """-> (export dir, description, torch source: run dir or state-dict file)."""
    from inspection.export import ExportCheckError, ExportConfig, export_onnx

    cfg = ExportConfig(int8=True, measure_latency=False, max_parity_images=64, calibration_images=200)
    for run in runs:
        export_dir = out / f"export-{run.parent.name}-{run.name}"
        if not (export_dir / "model.onnx").is_file():
            try:
                export_onnx(cfg, run, export_dir)
            except ExportCheckError as exc:
                notes.append(f"run {run} not used: export refused it ({exc})")
                logger.warning(notes[-1])
                continue
        return export_dir, f"run {run} (trained on the real images)", run
    export_dir = out / "export-fresh-head"
    # no trained run: pretrained Lite0 + fresh head (latency does not depend on the head's weights)
    import torch

    from inspection.models import build_net

    state = out / "fresh_head.pt"
    torch.manual_seed(0)
    net = build_net(pretrained=True).eval()
    if not (export_dir / "model.onnx").is_file():
        samples = camera_photos(DEFAULT_IMAGES, 32)
        export_fresh_head(net, export_dir, samples, config=cfg, train=samples)
    torch.save(net.state_dict(), state)
    return export_dir, "pretrained tf_efficientnet_lite0 with a fresh head (no trained run found)", state


def _int8_for_latency(export_dir: Path, images: Path, out: Path) -> Path:
    from inspection.export.quantize import quantize_int8
    from inspection.images import read_image

    path = out / f"{export_dir.name}.latency-only.int8.onnx"
    if not path.is_file():
        files = sorted(images.glob("*/*.jp*g"))[::40][:100]
        quantize_int8(export_dir / "model.onnx", path, [read_image(p) for p in files])
    return path


class LabelledPhoto:
    """What `export_net` reads of a sample: a path and a label (from its def_front/ok_front folder)."""

    def __init__(self, path: Path, label: str | None = None):
        self.path = path
        self.label = label or ("defect" if "def_" in path.parent.name else "ok")


def camera_photos(images: Path, per_class: int, step: int = 1) -> list[LabelledPhoto]:
    """The first `per_class` good and defective camera JPEGs (every `step`-th), as export samples."""
    files = sorted(images.glob("ok_front/*.jp*g"))[::step][:per_class]
    return [LabelledPhoto(p) for p in files + sorted(images.glob("def_front/*.jp*g"))[::step][:per_class]]


def export_fresh_head(
    net: Any,
    export_dir: Path,
    samples: list[LabelledPhoto],
    version: str = "bench-fresh-head",
    thresholds: tuple[float, float] = (0.5, 0.3),
    notes: str | None = None,
    config: Any = None,
    train: list[LabelledPhoto] | None = None,
) -> None:
    """Export a pretrained Lite0 with an untrained head (what the benches time: cost does not depend on the head)."""
    from datetime import UTC, datetime

    from inspection.export import ExportConfig, export_net
    from inspection.schemas import ModelCard, Thresholds

    card = ModelCard(
        version=version,
        created_at=datetime.now(UTC),
        backbone="tf_efficientnet_lite0",
        mode="head",
        class_names=["ok", "defect"],
        preprocess=net.preprocess.config.to_dict(),
        thresholds=Thresholds(reject=thresholds[0], review=thresholds[1]),
        target_escape_rate=0.01,
        data_fingerprint="0" * 64,
        n_train=0,
        **({"notes": notes} if notes else {}),
    )
    export_net(config or ExportConfig(measure_latency=False), net, card, export_dir, val=samples, train=train or ())


def load_images(folder: Path, n: int) -> list[bytes]:
    files = sorted(folder.glob("*/*.jp*g"))
    if not files:
        raise SystemExit(f"no JPEGs under {folder}: pass --images or set INSPECTION_REAL_DATA")
    step = max(1, len(files) // n)
    return [p.read_bytes() for p in files[::step][:n]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve-runner", "serve-torch"])
    p.add_argument("source", nargs="?", type=Path)
    p.add_argument("--port", type=int)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads of the runner")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the plain server (its best here)")
    p.add_argument("--run", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "runner")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--n-seq", type=int, default=400)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="GPU box: TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
    )
    p.add_argument("--max-batch", type=int, default=16, help="runner micro-batch limit (GPU: 64)")
    p.add_argument("--workers", type=int, default=None, help="runner model workers (default: the runner's)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.mode == "serve-runner":
        serve_runner(args.source, args.port, args.threads, args.providers.split(","), args.max_batch, args.workers)
        return 0
    if args.mode == "serve-torch":
        serve_torch(args.source, args.port, args.threads)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    export_dir, model_desc, torch_source = prepare_model(_candidate_runs(args.run), args.out, notes)
    images = load_images(args.images, 200)
    card = json.loads((export_dir / "model_card.json").read_text())
    report: dict = {
        "machine": f"{os.cpu_count()} CPU cores; providers asked: {args.providers}",
        "model": model_desc,
        "model_version": card["version"],
        "images": f"{len(images)} real camera JPEGs ({args.images})",
        "threads": {"runner_onnxruntime": args.threads, "plain_torch": args.torch_threads},
        "client": (
            "sequential: http.client keep-alive; concurrent: one asyncio loop with N keep-alive connections; "
            "raw JPEG body, Content-Type image/jpeg"
        ),
        "notes": notes,
        "results": {},
    }
    variants = [("runner_fp32", ["serve-runner", str(export_dir / "model.onnx")])]
    int8 = export_dir / "model.int8.onnx"
    if not int8.is_file():
        int8 = _int8_for_latency(export_dir, args.images, args.out)
        report["int8_note"] = (
            "the export's INT8 accuracy gate dropped model.int8.onnx (see export.json); this INT8 model was "
            "quantized by the benchmark the same way, for latency only: it would not be allowed to serve"
        )
    variants.append(("runner_int8", ["serve-runner", str(int8)]))
    if not args.skip_torch:
        variants.append(("plain_torch_eager_fp32", ["serve-torch", str(torch_source)]))
    for name, cmd in variants:
        logger.info("measuring %s", name)
        extra = ["--providers", args.providers, "--max-batch", str(args.max_batch)] if name.startswith("runner") else []
        if args.workers and name.startswith("runner"):
            extra += ["--workers", str(args.workers)]
        threads = args.threads if name.startswith("runner") else args.torch_threads
        report["results"][name] = run_server(cmd, images, args.n_seq, args.duration, args.clients, threads, extra)
        logger.info("%s: %s", name, json.dumps(report["results"][name]))
    res = report["results"]
    base = res.get("plain_torch_eager_fp32", {}).get("concurrent", {}).get("parts_per_s")
    if base:
        report["speedup_vs_plain_torch"] = {
            k: round(v["concurrent"]["parts_per_s"] / base, 2) for k, v in res.items() if k.startswith("runner")
        }
    report["goals"] = {"p50_ms": 10, "p99_ms": 25, "parts_per_s_8_clients": 150, "speedup": 3}
    text = json.dumps(report, indent=2)
    (args.out / "runner.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
