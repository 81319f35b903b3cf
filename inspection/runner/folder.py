"""Folder mode: the camera drops image files into a folder; each is inspected exactly once, also across restarts.

Per file, in this order (each step survives a crash of the one after it):
1. read the bytes and compute the file's identity (sha256 of the bytes + file name);
2. if the store already knows that identity, the file was decided before a crash: finish the remaining steps
   from the stored decision (no second inference, no second JSON line);
3. otherwise inspect it (same micro-batcher as HTTP) and store the decision together with the identity in one
   transaction;
4. append the result as one JSON line (an `InspectionResult`) to the results file, fsync, mark it emitted;
5. move the file to `processed/` (model verdict) or `flagged/` (no model verdict: bad image or model error,
   with a `<name>.reason.json` beside it).
Files still being written (younger than `settle_s`), hidden files and temporary names are left alone. The files
are the runner's station's parts, judged by that station's product (`station_products`, else `product`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from inspection.decisions import result_from_row
from inspection.errors import ImageValidationError
from inspection.images import decode_image
from inspection.schemas import InspectionResult

if TYPE_CHECKING:
    from inspection.runner.runtime import Runtime

logger = logging.getLogger(__name__)

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".reason.json")


class FolderWatcher:
    def __init__(self, runtime: Runtime):
        cfg = runtime.config.folder
        assert cfg.watch is not None
        self.rt = runtime
        self.slot = runtime.slot_for_station(runtime.config.station)  # the one product of this folder's parts
        self.watch = Path(cfg.watch)
        self.processed = Path(cfg.processed_dir or self.watch / "processed")
        self.flagged = Path(cfg.flagged_dir or self.watch / "flagged")
        self.results = Path(cfg.results or self.watch / "results.jsonl")
        self.poll_s = cfg.poll_s
        self.settle_s = cfg.settle_s
        for d in (self.watch, self.processed, self.flagged, self.results.parent):
            d.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._results_lock = threading.Lock()
        self.inspected = 0  # files inspected by this process (recoveries not counted)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="folder-watch", daemon=True)
        self._thread.start()
        logger.info(
            "folder mode: watching %s -> %s, %s; results %s", self.watch, self.processed, self.flagged, self.results
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.slot.holder.current is None:  # no model yet: wait rather than hold every file
                self._stop.wait(self.poll_s)
                continue
            try:
                self.scan_once()
            except Exception:  # the watcher must keep running; the file stays for the next round
                logger.exception("folder scan failed")
                self.rt.metrics.errors.labels("folder").inc()
            self._stop.wait(self.poll_s)

    # -- work ----------------------------------------------------------------------------------------------

    def candidates(self) -> list[Path]:
        now = time.time()
        out = []
        with os.scandir(self.watch) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or name.endswith(TEMP_SUFFIXES) or not entry.is_file(follow_symlinks=False):
                    continue
                path = Path(entry.path)
                if path == self.results:
                    continue
                st = entry.stat()
                if now - st.st_mtime < self.settle_s:
                    continue  # may still be being written
                out.append((st.st_mtime, name, path))
        return [p for _, _, p in sorted(out)]

    def scan_once(self) -> int:
        """Handle every settled file once; returns how many were handled."""
        n = 0
        for path in self.candidates():
            if self._stop.is_set():
                break
            self.handle(path)
            n += 1
        return n

    def handle(self, path: Path) -> InspectionResult | None:
        limits = self.rt.config.image_limits
        try:
            with open(path, "rb") as fh:
                data = fh.read(limits.max_bytes + 1)
        except FileNotFoundError:
            return None  # taken away meanwhile
        sha = hashlib.sha256(data).hexdigest()
        # bytes + name: the same photo under a new name is a new part; a name reused for new bytes is too
        identity = f"{sha}:{hashlib.sha256(path.name.encode()).hexdigest()[:40]}"
        known = self.rt.store.folder_file(identity)
        if known is not None:
            return self._recover(path, known)

        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        part_id = path.stem[:256] or request_id
        station = self.rt.config.station
        pred = image = None
        reason = None
        try:
            image = decode_image(data, limits)
            future = self.slot.batcher.submit(image)
            pred = future.result(timeout=self.rt.config.batching.timeout_s)
        except ImageValidationError as exc:
            reason = f"{exc.reason}: {exc.detail}"
            self.rt.metrics.errors.labels(exc.reason).inc()
        except Exception as exc:  # model error, timeout, overload: held, like HTTP's 503
            reason = f"model_error: {type(exc).__name__}: {exc}"[:500]
            self.rt.metrics.errors.labels("model_error").inc()
        result = self.rt.decide(request_id, part_id, station, t0, pred, reason, sha, self.slot.product)
        destination = "processed" if pred is not None else "flagged"
        keep = data if len(data) <= limits.max_bytes else None
        self.rt.store.record_inspection(
            result,
            keep,
            pred.heatmap if pred is not None else None,
            "folder",
            folder_identity=(identity, path.name, destination),
        )
        self.inspected += 1
        self.rt.after_record(result, "folder")
        self._emit(result)
        self.rt.store.mark_emitted(identity)
        self._move(path, destination, reason)
        if reason:
            logger.warning("folder: %s held (%s)", path.name, reason)
        return result

    def _recover(self, path: Path, known: dict) -> InspectionResult | None:
        """A file decided before (the process stopped before it was moved): finish without inspecting again."""
        row = self.rt.store.get_row(known["request_id"])
        result = result_from_row(row) if row else None
        if not known["emitted"] and result is not None and not self._already_emitted(result.request_id):
            self._emit(result)
        self.rt.store.mark_emitted(known["identity"])
        self._move(path, known["destination"], result.reason if result else None)
        logger.info(
            "folder: %s was decided before (request %s): moved, not inspected again", path.name, known["request_id"]
        )
        return result

    def _already_emitted(self, request_id: str) -> bool:
        if not self.results.is_file():
            return False
        needle = f'"request_id":"{request_id}"'
        with open(self.results, encoding="utf-8") as fh:
            return any(needle in line for line in fh)

    def _emit(self, result: InspectionResult) -> None:
        line = result.model_dump_json() + "\n"
        with self._results_lock, open(self.results, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def _move(self, path: Path, destination: str, reason: str | None) -> Path | None:
        folder = self.processed if destination == "processed" else self.flagged
        target = folder / path.name
        if target.exists():
            target = folder / f"{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        if destination == "flagged":
            sidecar = target.with_name(target.name + ".reason.json")
            sidecar.write_text(json.dumps({"file": path.name, "reason": reason}, indent=2) + "\n")
        return target
