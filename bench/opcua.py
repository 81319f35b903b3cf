"""Benchmark: OPC UA round trip (method call to result) next to HTTP, same runner process, same model.

    .venv/bin/python bench/opcua.py [--model EXPORT_DIR] [--out bench_out/opcua] [--images DIR] [--n 400]

One runner subprocess (the runner's defaults, 2 onnxruntime threads, CPU) serves HTTP on a free loopback port and
OPC UA on another; the client (this process) sends the same real camera JPEGs, one part at a time, and waits for
the verdict:
  * HTTP: POST /v1/inspect with the raw JPEG (http.client keep-alive), as bench/runner.py measures it;
  * OPC UA InspectImage(PartId, Image) over Basic256Sha256 SignAndEncrypt with a user (what a PLC would do),
    and over Sign only;
  * OPC UA Inspect(PartId, ImagePath): the runner reads the file the "camera" wrote under its image root.
Latency = from the call to the result in the client's hands (the runner has stored the decision by then).
Model: `--model` (an export folder with model.onnx), else the last one this benchmark made, else the pretrained
EfficientNet-Lite0 with a fresh head exported here (latency does not depend on the head's weights; needs the
train extra in this process only). Prints one JSON object and writes OUT/opcua.json.

Internal mode (used by the benchmark itself): `serve MODEL --http-port P --opcua-port Q --root DIR`.
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.runner import DEFAULT_IMAGES, Client, _free_port, _wait_ready, load_images  # noqa: E402

logger = logging.getLogger("bench.opcua")
USER, PASSWORD = "bench-plc", "bench-password"
STATION = "bench"


def serve(model_path: Path, http_port: int, opcua_port: int, root: Path, threads: int) -> None:
    import uvicorn

    from inspection.onnx_infer import OnnxModel
    from inspection.runner import RunnerConfig, Runtime, create_app
    from inspection.runner.config import AuthConfig, OpcUaConfig
    from inspection.runner.inferencer import Inferencer, spinning_options

    os.environ["INSPECTION_OPCUA_USER"], os.environ["INSPECTION_OPCUA_PASSWORD"] = USER, PASSWORD
    store = Path(tempfile.mkdtemp(prefix="bench-opcua-store-"))
    cfg = RunnerConfig(
        store=str(store),
        station=STATION,
        threads=threads,
        auth=AuthConfig(required=False),
        opcua=OpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{opcua_port}", image_roots=(root,)),
    )
    rt = Runtime.build(cfg)
    model = OnnxModel(model_path, threads=threads, busy_threads=cfg.busy_threads, **spinning_options(cfg.spinning))
    inf = Inferencer(model, model.card.version, model.card, model_path)
    inf.smoke_test()
    inf.warm_up(5, [(300, 300)])
    rt.holder.swap(inf)
    (root.parent / "server_cert.path").write_text(str(rt.opcua.cert_path))  # the client trusts exactly this one
    uvicorn.run(create_app(cfg, rt), host="127.0.0.1", port=http_port, log_level="warning", access_log=False)


def _stats(lat: list[float], verdicts: dict[str, int]) -> dict:
    lat = sorted(lat)
    return {
        "n": len(lat),
        "p50_ms": round(statistics.median(lat), 2),
        "p90_ms": round(lat[int(0.9 * (len(lat) - 1))], 2),
        "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 2),
        "mean_ms": round(statistics.fmean(lat), 2),
        "verdicts": verdicts,
    }


def measure_http(port: int, images: list[bytes], n: int) -> dict:
    c = Client(port)
    for i in range(20):
        c.inspect(images[i % len(images)], f"hw{i}")
    lat, verdicts = [], {}
    for i in range(n):
        t0 = time.perf_counter()
        status, body = c.inspect(images[i % len(images)], f"h{i}")
        lat.append((time.perf_counter() - t0) * 1000)
        v = json.loads(body)["verdict"] if status == 200 else f"http_{status}"
        verdicts[v] = verdicts.get(v, 0) + 1
    return _stats(lat, verdicts)


async def measure_opcua(port: int, cert_dir: Path, server_cert: str, images, paths, n: int, mode_name: str) -> dict:
    from asyncua import Client as UaClient
    from asyncua import ua
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key, cert = cert_dir / "client_key.pem", cert_dir / "client_cert.der"
    uri = "urn:bench:opcua-client"
    await setup_self_signed_certificate(key, cert, uri, "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {})
    c = UaClient(f"opc.tcp://127.0.0.1:{port}", timeout=30)
    c.application_uri = uri
    mode = (
        ua.MessageSecurityMode.SignAndEncrypt if mode_name.startswith("sign_encrypt") else ua.MessageSecurityMode.Sign
    )
    await c.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), server_certificate=server_cert, mode=mode)
    c.set_user(USER)
    c.set_password(PASSWORD)
    async with c:
        idx = await c.get_namespace_index("urn:inspection:runner")
        station = c.get_node(ua.NodeId(STATION, idx))
        by_path = mode_name.endswith("path")
        method = ua.NodeId(f"{STATION}/{'Inspect' if by_path else 'InspectImage'}", idx)
        args = paths if by_path else images
        for i in range(20):
            await station.call_method(method, f"ow{i}", args[i % len(args)])
        lat, verdicts = [], {}
        for i in range(n):
            t0 = time.perf_counter()
            out = await station.call_method(method, f"o{i}", args[i % len(args)])
            lat.append((time.perf_counter() - t0) * 1000)
            verdicts[out[1]] = verdicts.get(out[1], 0) + 1
    return _stats(lat, verdicts)


def prepare_model(out: Path) -> tuple[Path, str]:
    """An export folder with model.onnx: the last one made here, else pretrained Lite0 + fresh head (torch)."""
    export_dir = out / "export-fresh-head"
    desc = "pretrained tf_efficientnet_lite0 with a fresh head (latency does not depend on the head's weights)"
    if (export_dir / "model.onnx").is_file():
        return export_dir, desc
    import torch

    from bench.runner import camera_photos, export_fresh_head
    from inspection.models import build_net

    torch.manual_seed(0)
    net = build_net(pretrained=True).eval()
    export_fresh_head(net, export_dir, camera_photos(DEFAULT_IMAGES, 16))
    return export_dir, desc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve"])
    p.add_argument("source", nargs="?", type=Path)
    p.add_argument("--http-port", type=int)
    p.add_argument("--opcua-port", type=int)
    p.add_argument("--root", type=Path)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads of the runner")
    p.add_argument("--model", type=Path, help="export folder with model.onnx")
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "opcua")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--n", type=int, default=400, help="sequential parts per path")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    if args.mode == "serve":
        serve(args.source, args.http_port, args.opcua_port, args.root, args.threads)
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    export_dir, desc = (args.model, f"export {args.model}") if args.model else prepare_model(args.out)
    images = load_images(args.images, 200)
    work = Path(tempfile.mkdtemp(prefix="bench-opcua-"))
    root = work / "camera"
    root.mkdir()
    paths = []
    for i, body in enumerate(images):  # the "camera" writes each frame where the runner may read it
        (root / f"frame-{i:03d}.jpg").write_bytes(body)
        paths.append(str(root / f"frame-{i:03d}.jpg"))
    http_port, opcua_port = _free_port(), _free_port()
    cmd = [sys.executable, __file__, "serve", str(export_dir / "model.onnx"), "--http-port", str(http_port)]
    cmd += ["--opcua-port", str(opcua_port), "--root", str(root), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = {}
    load_before = os.getloadavg()
    try:
        _wait_ready(http_port, proc)
        server_cert = (work / "server_cert.path").read_text()
        results["http"] = measure_http(http_port, images, args.n)
        logger.info("http: %s", results["http"])
        for name in ("opcua_sign_encrypt_bytes", "opcua_sign_bytes", "opcua_sign_encrypt_path"):
            results[name] = asyncio.run(measure_opcua(opcua_port, work, server_cert, images, paths, args.n, name[6:]))
            logger.info("%s: %s", name, results[name])
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    card = json.loads((export_dir / "model_card.json").read_text())
    report = {
        "machine": f"{os.cpu_count()} CPU cores, CPUExecutionProvider, {args.threads} onnxruntime threads",
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": desc,
        "model_version": card["version"],
        "images": f"{len(images)} real camera JPEGs ({args.images}), mean {statistics.fmean(map(len, images)):.0f} B",
        "client": "one part at a time; HTTP: http.client keep-alive; OPC UA: one asyncua session, user + password",
        "results": results,
        "opcua_minus_http_p50_ms": round(results["opcua_sign_encrypt_bytes"]["p50_ms"] - results["http"]["p50_ms"], 2),
    }
    text = json.dumps(report, indent=2)
    (args.out / "opcua.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
