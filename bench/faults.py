"""Benchmark: the line-side runner under the faults a line box meets, each against a real runner process.

    .venv/bin/python bench/faults.py [--out bench_out/faults.json] [--cases kill9,sigterm,...] [--soak-seconds 600]

Every case starts `inspection runner serve` (the real CLI, `configs/runner.yaml`, a real registry and decision
store) as a subprocess, puts 8 concurrent keep-alive HTTP clients on it sending real camera JPEGs
(`$INSPECTION_REAL_DATA`, default ../shared/data/casting/train), injects one fault mid-load, and afterwards looks
every answer's request id up again (`GET /v1/results/{id}` on the restarted runner for kill -9, directly in the
decision store otherwise) to count:
  * acknowledged: answers that carry a decision the runner says it stored (200 with a verdict, or a 4xx/503 hold
    with its stored `review`; a 503 `store_error` says the decision is NOT stored and is not acknowledged);
  * lost: acknowledged but not in the store; changed: in the store with another verdict, score or model;
  * passed without verdict: a `pass` answer (or stored row) without a model score, or a `pass` not stored;
  * failed requests: everything that is not a 200, by status and reason (or connection error).
Cases: kill9, sigterm, disk_full, registry_vanish, corrupt_model, store_lock, soak (see each function). disk_full
and registry_vanish mount small tmpfs filesystems (root needed) and unmount them in a finally.

Model: pretrained EfficientNet-Lite0 at the camera's 300 px (what production serves) with a fresh head, exported
here once (torch needed in this process only) into OUT_DIR/export-lite0-300; its thresholds are set at the
thirds of its scores on real photos, so the stream gets pass, review and reject verdicts (inference cost does not
depend on the head's weights). The export gets a `smoke_reference.json` (its outputs on the runner's smoke
frames), as an export should, so the runner can refuse a file damaged before it was hashed. `--model EXPORT_DIR`
uses another export. Prints one JSON object and writes it to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.runner import DEFAULT_IMAGES, load_images  # noqa: E402

logger = logging.getLogger("bench.faults")
TOKEN = "faults-bench-token"
STATION = "faults"
CASES = ("kill9", "sigterm", "disk_full", "registry_vanish", "corrupt_model", "store_lock", "soak")


# -- model and registry ------------------------------------------------------------------------------------------


def prepare_model(out_dir: Path, images: Path) -> Path:
    """An export of pretrained Lite0 at 300 px with a fresh head, thresholds at the thirds of its real scores."""
    export_dir = out_dir / "export-lite0-300"
    if (export_dir / "model.onnx").is_file():
        return export_dir
    import numpy as np
    import torch

    from bench.runner import camera_photos, export_fresh_head
    from inspection.images import read_image
    from inspection.models import build_net

    torch.manual_seed(0)
    net = build_net(pretrained=True, input_size=300).eval()
    photos = camera_photos(images, 40, step=50)
    with torch.inference_mode():
        scores = [float(net(torch.from_numpy(read_image(p.path))[None])[0][0]) for p in photos]
    review, reject = (float(q) for q in np.quantile(scores, [1 / 3, 2 / 3]))
    logger.info(
        "fresh-head scores on %d photos: %.4f..%.4f; review %.4f, reject %.4f",
        len(photos),
        min(scores),
        max(scores),
        review,
        reject,
    )
    notes = "fault benchmark: pretrained tf_efficientnet_lite0 at 300 px, fresh head, thresholds at score thirds"
    export_fresh_head(net, export_dir, photos[::4], version="faults-a", thresholds=(reject, review), notes=notes)
    return export_dir


def ensure_reference(export_dir: Path) -> None:
    """Record the exported model's outputs on the runner's smoke frames (smoke_reference.json, listed in the
    card), as an export does: the runner refuses a file that does not reproduce them."""
    from inspection.onnx_infer import OnnxModel
    from inspection.registry import sha256_file
    from inspection.runner.inferencer import REFERENCE_FILE, smoke_reference

    card_path = export_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    if REFERENCE_FILE in card["files"]:
        return
    model = OnnxModel(export_dir / "model.onnx", providers=["CPUExecutionProvider"], threads=2)
    ref = {"model.onnx": smoke_reference(model, int(card["preprocess"]["input_size"]))}
    (export_dir / REFERENCE_FILE).write_text(json.dumps(ref))
    card["files"][REFERENCE_FILE] = sha256_file(export_dir / REFERENCE_FILE)
    card_path.write_text(json.dumps(card, indent=2))


def _copy_version(export_dir: Path, dest: Path, version: str, damage: str | None = None) -> Path:
    """A copy of the export under another version name; `damage` breaks model.onnx the way a bad deploy does,
    and the card lists the broken file's sha256 (the broken file was exported and hashed as it is)."""
    from inspection.registry import sha256_file

    shutil.copytree(export_dir, dest)
    model = dest / "model.onnx"
    data = model.read_bytes()
    if damage == "truncated":  # a copy or an export cut short (disk full, dropped share)
        model.write_bytes(data[: len(data) // 3])
    elif damage == "zeroed":  # a quarter of the file zeroed (a crash during write-back)
        mid = len(data) // 2
        model.write_bytes(data[:mid] + bytes(len(data) // 4) + data[mid + len(data) // 4 :])
    elif damage == "zeroed_64k":  # 64 KiB of zeros inside the weights: still a valid ONNX file
        at = int(len(data) * 0.6)
        model.write_bytes(data[:at] + bytes(65536) + data[at + 65536 :])
    elif damage == "not_onnx":  # an HTML error page saved as the model (a download through a proxy)
        model.write_bytes(b"<!doctype html><html><body>502 Bad Gateway</body></html>\n" * 10)
    card = json.loads((dest / "model_card.json").read_text())
    card["version"] = version
    card["files"]["model.onnx"] = sha256_file(model)
    (dest / "model_card.json").write_text(json.dumps(card, indent=2))
    return dest


def make_registry(root: Path, export_dir: Path, scratch: Path, extra: tuple[str, ...] = ("faults-b",)) -> None:
    """A registry with `faults-a` in production and the versions in `extra` registered (good copies)."""
    from inspection.registry import Registry, RegistryConfig

    reg = Registry.init(root, RegistryConfig())
    reg.register(export_dir, user="bench")
    reg.promote("faults-a", reason="fault benchmark", user="bench", force=True)
    for version in extra:
        reg.register(_copy_version(export_dir, scratch / f"export-{version}", version), user="bench")


def promote(root: Path, version: str) -> None:
    from inspection.registry import Registry

    Registry(root).promote(version, reason="fault benchmark deploy", user="bench", force=True)


# -- the runner process --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Runner:
    """`inspection runner serve` in its own process (its own session: signals reach it alone)."""

    def __init__(self, registry: Path, store: Path, log: Path, port: int | None = None, overrides: tuple = ()):
        self.registry, self.store, self.log_path = registry, store, log
        self.port = port or _free_port()
        self.overrides = overrides
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        """Start and wait until /readyz says ready; returns the seconds it took."""
        cmd = [sys.executable, "-m", "inspection.cli", "runner", "serve", "--config", str(REPO / "configs/runner.yaml")]
        cmd += ["--registry", str(self.registry), "--store", str(self.store), "--station", STATION]
        cmd += ["--port", str(self.port), "--set", "swap.poll_s=0.5"]
        for o in self.overrides:
            cmd += ["--set", o]
        env = dict(os.environ, INSPECTION_RUNNER_TOKEN=TOKEN)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO
        )
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"runner exited with {self.proc.returncode}; see {self.log_path}")
            status, _ = self.get("/readyz")
            if status == 200:
                return time.perf_counter() - t0
            time.sleep(0.2)
        raise RuntimeError(f"runner not ready within {timeout} s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def get(self, path: str, timeout: float = 5) -> tuple[int | None, Any]:
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            c.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
            r = c.getresponse()
            body = r.read()
            c.close()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, body.decode(errors="replace")
        except OSError as exc:
            return None, str(exc)

    def metric(self, name: str) -> float:
        status, text = self.get("/metrics")
        if status != 200:
            return float("nan")
        return sum(float(line.rsplit(" ", 1)[1]) for line in str(text).splitlines() if line.startswith(name))

    def usage(self) -> tuple[float, int]:
        """(RSS MiB, open file descriptors) of the runner process."""
        rss = 0.0
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
        return rss, len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


# -- load: 8 keep-alive clients in one asyncio loop (a thread of this process) -----------------------------------


@dataclass(slots=True)
class Answer:
    client: int
    sent: float  # perf_counter
    done: float
    status: int | None  # None: no HTTP answer (connection refused/reset, client timeout)
    error: str | None = None
    request_id: str | None = None
    verdict: str | None = None
    reason: str | None = None
    score: float | None = None
    model_version: str | None = None

    @property
    def ms(self) -> float:
        return (self.done - self.sent) * 1000

    @property
    def acknowledged(self) -> bool:
        """The answer carries a decision the runner stored (a 503 store_error says it is not stored)."""
        return self.request_id is not None and (self.status == 200 or self.reason != "store_error")

    @property
    def kind(self) -> str:
        if self.status is None:
            return f"no answer ({self.error})"
        return str(self.status) if self.status == 200 else f"{self.status} {self.reason}"


@dataclass
class Load:
    """`clients` connections, each sending its next part as soon as the answer is in (after a 503 or a
    connection error it waits `backoff_s`, as a PLC would before its next part)."""

    port: int
    images: list[bytes]
    clients: int = 8
    backoff_s: float = 0.05
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        return self.answers

    def since(self, t: float) -> list[Answer]:
        return [a for a in list(self.answers) if a.sent >= t]

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(k) for k in range(self.clients)))

    async def _client(self, k: int) -> None:
        i = k
        reader = writer = None
        while not self._stop.is_set():
            body = self.images[i % len(self.images)]
            head = (
                f"POST /v1/inspect?part_id=f{k}-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            i += self.clients
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 5)
                writer.write(head + body)
                status, payload, close = await asyncio.wait_for(_read_response(reader), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                self.answers.append(Answer(k, t0, time.perf_counter(), None, _error_name(exc)))
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(self.backoff_s)
                continue
            a = Answer(k, t0, time.perf_counter(), status)
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = {}
            res = doc if status == 200 else (doc.get("result") or {})
            a.reason = None if status == 200 else doc.get("reason") or str(doc.get("detail"))[:60]
            a.request_id, a.verdict = res.get("request_id"), res.get("verdict")
            a.score, a.model_version = res.get("defect_score"), res.get("model_version")
            self.answers.append(a)
            if close:  # the server said so (a draining runner): the next part opens a new connection
                writer.close()
                reader = writer = None
            if status != 200:
                await asyncio.sleep(self.backoff_s)
        if writer is not None:
            writer.close()


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | asyncio.IncompleteReadError):
        return "connection reset/closed"
    if isinstance(exc, TimeoutError):
        return "client timeout 30 s"
    return type(exc).__name__


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, the server closes the connection after this answer)."""
    status_line = await reader.readline()
    if not status_line:
        raise asyncio.IncompleteReadError(b"", None)
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"connection" and value.strip().lower() == b"close":
            close = True
    return int(status_line.split(b" ", 2)[1]), await reader.readexactly(length), close


# -- verification ---------------------------------------------------------------------------------------------------


def store_rows(store: Path) -> dict[str, dict]:
    """Every decision in the store (read-only connection: works while a runner writes)."""
    con = sqlite3.connect(f"file:{store / 'decisions.sqlite'}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        rows = con.execute("SELECT request_id, verdict, defect_score, model_version, reason FROM inspections")
        return {r["request_id"]: dict(r) for r in rows}
    finally:
        con.close()


def http_rows(runner: Runner, ids: list[str]) -> dict[str, dict]:
    """Each id looked up through the (restarted) runner's GET /v1/results/{id}."""
    out: dict[str, dict] = {}
    c = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=30)
    for rid in ids:
        c.request("GET", f"/v1/results/{rid}", headers={"Authorization": f"Bearer {TOKEN}"})
        r = c.getresponse()
        body = r.read()
        if r.status == 200:
            doc = json.loads(body)
            out[rid] = {k: doc.get(k) for k in ("verdict", "defect_score", "model_version", "reason")}
    c.close()
    return out


def integrity(store: Path) -> str:
    con = sqlite3.connect(f"file:{store / 'decisions.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return "; ".join(r[0] for r in con.execute("PRAGMA integrity_check"))
    finally:
        con.close()


def verify(answers: list[Answer], rows: dict[str, dict]) -> dict[str, Any]:
    """The counts every case reports (see the module docstring)."""
    acked = [a for a in answers if a.acknowledged]
    lost = [a for a in acked if a.request_id not in rows]
    changed = []
    for a in acked:
        row = rows.get(a.request_id)
        if row is None:
            continue
        same_score = (row["defect_score"] is None and a.score is None) or (
            row["defect_score"] is not None and a.score is not None and abs(row["defect_score"] - a.score) < 1e-9
        )
        if row["verdict"] != a.verdict or not same_score or row["model_version"] != a.model_version:
            changed.append(a)
    pass_no_verdict = [
        a for a in answers if a.verdict == "pass" and (a.status != 200 or a.score is None or a.request_id not in rows)
    ]
    stored_pass_no_score = [r for r in rows.values() if r["verdict"] == "pass" and r["defect_score"] is None]
    failures = Counter(a.kind for a in answers if a.status != 200)
    held_stored = sum(1 for a in answers if a.status not in (None, 200) and a.acknowledged and a.request_id in rows)
    return {
        "requests": len(answers),
        "acknowledged": len(acked),
        "lost": len(lost),
        "changed": len(changed),
        "passed_without_verdict": len(pass_no_verdict) + len(stored_pass_no_score),
        "failed_requests": sum(failures.values()),
        "failures": dict(failures.most_common()),
        "holds_stored_as_review": held_stored,
        "verdicts_200": dict(Counter(a.verdict for a in answers if a.status == 200)),
        "lost_examples": [a.request_id for a in lost[:5]],
        "changed_examples": [a.request_id for a in changed[:5]],
    }


def _latency(answers: list[Answer]) -> dict[str, float]:
    ms = sorted(a.ms for a in answers if a.status is not None)
    if not ms:
        return {}
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1),
    }


def _wait(cond, timeout: float, step: float = 0.1) -> float | None:
    """Seconds until cond() is true, or None on timeout."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if cond():
            return round(time.perf_counter() - t0, 2)
        time.sleep(step)
    return None


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0 or not os.path.ismount(path):
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


# -- the cases ------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    export_dir: Path
    images: list[bytes]
    work: Path
    clients: int = 8
    pre_s: float = 6.0  # load before the fault: warm, batches full

    def case_dir(self, name: str) -> Path:
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def registry(self, d: Path, extra: tuple[str, ...] = ("faults-b",)) -> Path:
        make_registry(d / "registry", self.export_dir, d, extra)
        return d / "registry"

    def load(self, runner: Runner) -> Load:
        return Load(runner.port, self.images, self.clients).start()

    # kill -9 mid-load, restart on the same store: every acknowledged decision found, unchanged
    def kill9(self) -> dict:
        d = self.case_dir("kill9")
        reg = self.registry(d, ())
        runner = Runner(reg, d / "store", d / "runner.log")
        runner.start()
        load = self.load(runner)
        time.sleep(self.pre_s)
        t_kill = time.perf_counter()
        os.kill(runner.pid, signal.SIGKILL)
        runner.proc.wait()
        restart_s = runner.start()  # same store, same port
        down_s = time.perf_counter() - t_kill
        time.sleep(self.pre_s / 2)
        answers = load.stop()
        acked = [a.request_id for a in answers if a.acknowledged]
        rows = http_rows(runner, acked)  # through the restarted runner
        runner.stop()
        before = [a for a in answers if a.done < t_kill]
        return {
            **verify(answers, rows),
            "acknowledged_before_kill": sum(1 for a in before if a.acknowledged),
            "restart_to_ready_s": round(restart_s, 1),
            "down_s": round(down_s, 1),
            "looked_up_via": "GET /v1/results/{id} on the restarted runner",
            "integrity_check": integrity(d / "store"),
        }

    # SIGTERM mid-load: in-flight answered, new ones 503 + stored review, exit within a bound
    def sigterm(self) -> dict:
        d = self.case_dir("sigterm")
        reg = self.registry(d, ())
        runner = Runner(reg, d / "store", d / "runner.log")
        runner.start()
        load = self.load(runner)
        time.sleep(self.pre_s)
        t_sig = time.perf_counter()
        runner.proc.send_signal(signal.SIGTERM)
        try:
            rc = runner.proc.wait(120)
        except subprocess.TimeoutExpired:
            rc = "still running after 120 s"
            runner.proc.kill()
        exit_s = time.perf_counter() - t_sig
        time.sleep(0.5)
        answers = load.stop()
        in_flight = [a for a in answers if a.sent < t_sig <= a.done]
        new = [a for a in answers if a.sent >= t_sig]
        rows = store_rows(d / "store")
        return {
            **verify(answers, rows),
            "exit_s": round(exit_s, 2),
            "exit_code": rc,
            "in_flight_at_sigterm": len(in_flight),
            "in_flight_answered_200": sum(1 for a in in_flight if a.status == 200),
            "in_flight_outcomes": dict(Counter(a.kind for a in in_flight)),
            "sent_after_sigterm": len(new),
            "sent_after_outcomes": dict(Counter(a.kind for a in new)),
            "sent_after_stored_as_review": sum(
                1 for a in new if a.request_id in rows and rows[a.request_id]["verdict"] == "review"
            ),
            "integrity_check": integrity(d / "store"),
        }

    # the decision store's filesystem full, then space back
    def disk_full(self, full_s: float = 8.0, after_s: float = 8.0) -> dict:
        d = self.case_dir("disk_full")
        reg = self.registry(d, ())
        mnt = d / "store_fs"
        with tmpfs(mnt, "32m"):
            store = mnt / "store"
            runner = Runner(reg, store, d / "runner.log")
            try:
                runner.start()
                load = self.load(runner)
                time.sleep(self.pre_s)
                filler = mnt / "filler"
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)  # take every free block of the filesystem
                try:
                    for size in (1 << 20, 65536, 4096, 512):
                        with contextlib.suppress(OSError):
                            while os.write(fd, bytes(size)) > 0:
                                pass
                finally:
                    os.close(fd)
                t_full = time.perf_counter()
                free_kb = shutil.disk_usage(mnt).free // 1024
                time.sleep(full_s)
                ready_full = runner.get("/readyz")
                filler.unlink()
                t_space = time.perf_counter()
                first_ok = _wait(
                    lambda: any(a.status == 200 for a in load.since(time.perf_counter() - 0.3)), after_s, 0.05
                )
                time.sleep(after_s)
                ready_after = runner.get("/readyz")
                answers = load.stop()
                rows = store_rows(store)
                runner.stop()
                check = integrity(store)
            finally:
                runner.stop()
        during = [a for a in answers if t_full <= a.sent < t_space]
        first_fail = min((a.done for a in during if a.status != 200), default=t_space)  # answered by then
        after = [a for a in answers if a.sent >= t_space + (first_ok or 0)]
        return {
            **verify(answers, rows),
            "free_kb_when_full": free_kb,
            "full_s": full_s,
            "answers_while_full": dict(Counter(f"{a.kind} {a.verdict}" for a in during)),
            "first_failure_after_full_s": round(first_fail - t_full, 2),
            "pass_while_full": sum(1 for a in during if a.verdict == "pass"),
            "pass_while_full_stored": sum(1 for a in during if a.verdict == "pass" and a.request_id in rows),
            "pass_after_first_failure_while_full": sum(
                1 for a in during if a.verdict == "pass" and a.sent >= first_fail
            ),
            "readyz_while_full": ready_full,
            "first_200_after_space_s": first_ok,
            "after_space_returned": dict(Counter(a.kind for a in after)),
            "readyz_after": ready_after,
            "integrity_check": check,
        }

    # the registry folder (a network share) vanishing and coming back: renamed away/back, then unmounted/remounted
    def registry_vanish(self, gone_s: float = 5.0) -> dict:
        d = self.case_dir("registry_vanish")
        mnt = d / "share"
        out: dict[str, Any] = {}
        with tmpfs(mnt, "96m"):
            reg = mnt / "registry"
            make_registry(reg, self.export_dir, d, ("faults-b",))
            runner = Runner(reg, d / "store", d / "runner.log")
            try:
                runner.start()
                load = self.load(runner)
                time.sleep(self.pre_s)
                phases = {}
                for phase, target in (("renamed", "faults-b"), ("unmounted", "faults-a")):
                    backup = d / "registry.backup"
                    t_gone = time.perf_counter()
                    if phase == "renamed":
                        reg.rename(mnt / "registry.away")
                    else:
                        shutil.rmtree(backup, ignore_errors=True)
                        shutil.copytree(reg, backup, symlinks=True)
                        subprocess.run(["umount", "-l", str(mnt)], check=True)  # the share is gone: empty folder
                    time.sleep(gone_s)
                    ready_gone = runner.get("/readyz")
                    served_gone = Counter(a.model_version for a in load.since(t_gone) if a.status == 200)
                    if phase == "renamed":
                        (mnt / "registry.away").rename(reg)
                    else:
                        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)], check=True)
                        shutil.copytree(backup, reg, symlinks=True)  # the share is back, as it was
                    t_back = time.perf_counter()
                    undegraded_s = _wait(lambda: not runner.get("/readyz")[1].get("degraded", False), 20)
                    promote(reg, target)  # a deploy after the share came back: the runner must pick it up
                    t_promote = time.perf_counter()
                    swap_s = _wait(lambda v=target, t=t_promote: any(a.model_version == v for a in load.since(t)), 60)
                    phases[phase] = {
                        "readyz_while_gone": ready_gone,
                        "served_while_gone": dict(served_gone),
                        "failed_while_gone": dict(
                            Counter(a.kind for a in load.since(t_gone) if a.sent < t_back and a.status != 200)
                        ),
                        "readyz_not_degraded_after_s": undegraded_s,
                        "swap_after_return": target,
                        "swapped_within_s": swap_s,
                    }
                time.sleep(1)
                answers = load.stop()
                out["phases"] = phases
                out["watcher_errors"] = runner.metric('inspection_runner_errors_total{kind="registry"}')
            finally:
                runner.stop()
        rows = store_rows(d / "store")
        return {**verify(answers, rows), **out}

    # a corrupt or truncated model registered and promoted as a new production version under load
    def corrupt_model(self) -> dict:
        d = self.case_dir("corrupt_model")
        reg = self.registry(d, ("faults-b",))
        runner = Runner(reg, d / "store", d / "runner.log")
        deploys = {}
        try:
            runner.start()
            load = self.load(runner)
            time.sleep(self.pre_s)
            from inspection.registry import Registry

            for damage in ("truncated", "not_onnx", "zeroed", "zeroed_64k", "sha_mismatch"):
                version = f"faults-bad-{damage}"
                src = _copy_version(
                    self.export_dir, d / f"export-{version}", version, None if damage == "sha_mismatch" else damage
                )
                Registry(reg).register(src, user="bench")
                if damage == "sha_mismatch":  # registered intact, then damaged on the share: sha256 no longer matches
                    model = reg / "versions" / version / "model.onnx"
                    data = bytearray(model.read_bytes())
                    data[len(data) // 2] ^= 0xFF
                    model.write_bytes(bytes(data))
                refused0 = runner.metric('inspection_runner_model_swaps_total{outcome="refused"}')
                t0 = time.perf_counter()
                if damage == "sha_mismatch":  # the registry would refuse to promote it: the alias edited by hand
                    aliases = json.loads((reg / "aliases.json").read_text())
                    (reg / "aliases.tmp").write_text(json.dumps({**aliases, "production": version}))
                    os.replace(reg / "aliases.tmp", reg / "aliases.json")
                else:
                    promote(reg, version)
                decided = _wait(
                    lambda r0=refused0: (
                        runner.metric('inspection_runner_model_swaps_total{outcome="refused"}') > r0
                        or runner.get("/readyz")[1].get("model_version") != "faults-a"
                    ),
                    60,
                )
                ready = runner.get("/readyz")[1]
                deploys[damage] = {
                    "outcome": "served (NOT refused)" if ready.get("model_version") == version else "refused",
                    "decided_within_s": decided,
                    "serving": ready.get("model_version"),
                    "readyz": ready,
                    "answers_by_model_since": dict(Counter(a.model_version for a in load.since(t0) if a.status == 200)),
                }
                if ready.get("model_version") == version:  # roll the bad deploy back: the next starts from A
                    aliases = {"production": "faults-a", "previous": None}
                    (reg / "aliases.tmp").write_text(json.dumps(aliases))
                    os.replace(reg / "aliases.tmp", reg / "aliases.json")
                    _wait(lambda: runner.get("/readyz")[1].get("model_version") == "faults-a", 60)
                time.sleep(1)
            t_good = time.perf_counter()
            promote(reg, "faults-b")
            good_s = _wait(lambda: any(a.model_version == "faults-b" for a in load.since(t_good)), 60)
            time.sleep(1)
            answers = load.stop()
        finally:
            runner.stop()
        rows = store_rows(d / "store")
        return {
            **verify(answers, rows),
            "deploys": deploys,
            "good_version_after_swapped_within_s": good_s,
            "answers_by_model": dict(Counter(a.model_version for a in answers if a.status == 200)),
        }

    # the review app holding a write transaction on the shared SQLite store
    def store_lock(self, hold_s: float = 2.0) -> dict:
        d = self.case_dir(f"store_lock_{hold_s:g}s")
        reg = self.registry(d, ())
        runner = Runner(reg, d / "store", d / "runner.log")
        try:
            runner.start()
            load = self.load(runner)
            time.sleep(self.pre_s)
            con = sqlite3.connect(d / "store" / "decisions.sqlite", isolation_level=None, timeout=30)
            t_lock = time.perf_counter()
            con.execute("BEGIN IMMEDIATE")
            time.sleep(hold_s)
            con.execute("COMMIT")
            t_unlock = time.perf_counter()
            con.close()
            time.sleep(self.pre_s / 2)
            answers = load.stop()
            timeout_s = 5.0  # configs/runner.yaml batching.timeout_s
        finally:
            runner.stop()
        rows = store_rows(d / "store")
        window = [a for a in answers if a.done >= t_lock and a.sent <= t_unlock]
        return {
            **verify(answers, rows),
            "lock_held_s": round(t_unlock - t_lock, 2),
            "runner_timeout_s": timeout_s,
            "answers_overlapping_lock": len(window),
            "overlapping_outcomes": dict(Counter(a.kind for a in window)),
            "overlapping_latency": _latency(window),
            "max_answer_s": round(max((a.ms for a in answers if a.status is not None), default=0) / 1000, 2),
            "answers_over_timeout": sum(1 for a in answers if a.status is not None and a.ms > timeout_s * 1000 + 500),
        }

    # a long run at 8 clients: RSS and fds flat after warm-up, p99 stable
    def soak(self, seconds: float) -> dict:
        d = self.case_dir("soak")
        reg = self.registry(d, ())
        runner = Runner(reg, d / "store", d / "runner.log")
        interval = 60.0 if seconds >= 300 else max(5.0, seconds / 5)
        warmup = min(60.0, seconds / 5)
        samples: list[tuple[float, float, int]] = []
        try:
            runner.start()
            load = self.load(runner)
            t0 = time.perf_counter()
            while (now := time.perf_counter()) - t0 < seconds:
                rss, fds = runner.usage()
                samples.append((now - t0, rss, fds))
                time.sleep(min(5.0, seconds / 40))
            answers = load.stop()
        finally:
            runner.stop()
        rows = store_rows(d / "store")
        per = []
        n_int = max(1, int(round(seconds / interval)))
        for k in range(n_int):
            lo, hi = t0 + k * interval, t0 + (k + 1) * interval
            batch = [a for a in answers if lo <= a.done < hi]
            s = [x for x in samples if k * interval <= x[0] < (k + 1) * interval]
            per.append(
                {
                    "t_end_s": round((k + 1) * interval),
                    **_latency(batch),
                    "parts_per_s": round(sum(1 for a in batch if a.status == 200) / interval, 1),
                    "rss_mib": round(max(x[1] for x in s), 1) if s else None,
                    "fds": max(x[2] for x in s) if s else None,
                }
            )

        def growth(idx: int) -> float:
            base = [x[idx] for x in samples if warmup <= x[0] < warmup + interval]
            end = [x[idx] for x in samples if x[0] >= seconds - interval]
            return round((statistics.median(end) / statistics.median(base) - 1) * 100, 2) if base and end else 0.0

        p99s = [p["p99_ms"] for p in per if "p99_ms" in p]
        return {
            **verify(answers, rows),
            "seconds": seconds,
            "warmup_s": warmup,
            "per_interval": per,
            "interval_s": interval,
            "rss_growth_pct_after_warmup": growth(1),
            "fd_growth_pct_after_warmup": growth(2),
            "rss_mib_after_warmup_end": [
                round(statistics.median([x[1] for x in samples if warmup <= x[0] < warmup + interval]), 1),
                round(statistics.median([x[1] for x in samples if x[0] >= seconds - interval]), 1),
            ],
            "p99_ms_min_max_over_intervals": [min(p99s), max(p99s)] if p99s else None,
            "overall_latency": _latency(answers),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench_out" / "faults.json")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--soak-seconds", type=float, default=600.0)
    p.add_argument("--pre-seconds", type=float, default=6.0, help="load before each fault")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--n-images", type=int, default=400, help="distinct photos cycled by the clients")
    p.add_argument("--model", type=Path, help="export folder with model.onnx (default: prepared here, 300 px)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one, removed after)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; allowed: {', '.join(CASES)}")
    if os.geteuid() != 0 and {"disk_full", "registry_vanish"} & set(cases):
        p.error("disk_full and registry_vanish mount tmpfs filesystems: run as root (or leave them out)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export_dir = args.model or prepare_model(args.out.parent / "faults", args.images)
    ensure_reference(export_dir)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    bench = Bench(export_dir, load_images(args.images, args.n_images), work, args.clients, args.pre_seconds)
    card = json.loads((export_dir / "model_card.json").read_text())
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} CPU cores, CPUExecutionProvider (configs/runner.yaml: 2 onnxruntime threads)",
        "load_average_1min_before": round(os.getloadavg()[0], 2),
        "model": f"{export_dir} ({card.get('notes') or card['version']}, input {card['preprocess']['input_size']} px)",
        "images": f"{len(bench.images)} real camera JPEGs from {args.images}",
        "clients": args.clients,
        "runner": "inspection runner serve --config configs/runner.yaml (subprocess), SQLite decision store",
        "cases": {},
    }
    try:
        for name in cases:
            logger.info("case %s", name)
            runs = [(name, lambda n=name: bench.soak(args.soak_seconds) if n == "soak" else getattr(bench, n)())]
            if name == "store_lock":  # and a transaction longer than the runner's timeout
                runs.append(("store_lock_8s", lambda: bench.store_lock(8.0)))
            for label, run in runs:
                t0 = time.perf_counter()
                try:
                    res = run()
                except Exception as exc:  # a broken case is reported, the others still run
                    logger.exception("case %s failed", label)
                    res = {"error": f"{type(exc).__name__}: {exc}"}
                res["case_wall_s"] = round(time.perf_counter() - t0, 1)
                report["cases"][label] = res
                logger.info("%s: %s", label, json.dumps(res, default=str)[:3000])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=2, default=str)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
