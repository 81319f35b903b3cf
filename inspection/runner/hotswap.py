"""Hot model swap: follow the registry's alias and replace the serving model without dropping a request.

One swapper per product served: it polls the mtime of that product's `aliases.json` (`REGISTRY/aliases.json` for
the product "default", `REGISTRY/products/<product>/aliases.json` for the others; the registry writes it
atomically), and publishes into that product's holder only, so a swap or a refused version of one product never
touches another's serving model. When it
changes (or no model serves yet), the alias is resolved; a new version is loaded, verified (sha256, smoke
inference) and warmed in this thread while the old one keeps serving, then published by one reference
assignment, which the micro-batcher reads once per batch. A version that fails any check is refused: the old
model keeps serving, the failure is logged and counted, and the version is not retried until the alias changes.

The registry is often a network share: it may vanish (unmounted, renamed, a stale handle, a dead server) and come
back. While it cannot be read the serving model stays, the watcher keeps polling (no OSError may end its thread),
and `degraded_reasons()` says so for /readyz; once it is readable again the alias is followed as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from inspection.runner.inferencer import Inferencer, load_inferencer
from inspection.runner.metrics import RunnerMetrics

logger = logging.getLogger(__name__)

ALIASES_FILE = "aliases.json"
NO_MODEL_RETRY_S = 10.0  # while nothing serves, re-read the alias this often even if the file did not change


class ModelHolder:
    """The serving model. Reading `.current` is one attribute load (atomic in CPython): no lock on the hot path."""

    def __init__(self) -> None:
        self.current: Inferencer | None = None
        self.ready = threading.Event()

    def swap(self, new: Inferencer) -> Inferencer | None:
        old, self.current = self.current, new
        self.ready.set()
        return old


class HotSwapper:
    def __init__(
        self,
        registry_root: str | Path,
        holder: ModelHolder,
        alias: str = "production",
        poll_s: float = 1.0,
        metrics: RunnerMetrics | None = None,
        loader: Callable[[str], Inferencer] | None = None,
        product: str | None = None,
    ):
        from inspection.registry import DEFAULT_PRODUCT, product_home

        self.registry_root = Path(registry_root)
        self.product = product or DEFAULT_PRODUCT
        self.root = product_home(self.registry_root, self.product)  # the folder whose aliases.json is followed
        self.holder = holder
        self.alias = alias
        self.poll_s = poll_s
        self.metrics = metrics
        self._load = loader or (lambda version: load_inferencer(self.registry_root, version, product=self.product))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one check at a time (poll thread vs admin endpoint)
        self._last_mtime: float | None = None
        self._last_attempt = 0.0
        self.refused: dict[str, str] = {}  # version -> why; not retried until the alias file changes
        self.last_error: str | None = None
        self.registry_error: str | None = None  # the registry cannot be read now (cleared when it can)
        self.alias_version: str | None = None  # what the alias said at the last successful read

    def _aliases_mtime(self) -> float | str | None:
        """mtime of the alias file; None when it is missing; the error text when the folder cannot be read
        (a share that went away: ESTALE, EIO, ENOTCONN, ...), so that a change either way triggers a check."""
        try:
            return (self.root / ALIASES_FILE).stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"

    def degraded_reasons(self) -> list[str]:
        """What is wrong while a model serves: the registry unreadable, or its alias on a refused version."""
        current = self.holder.current
        reasons = []
        if self.registry_error is not None:
            reasons.append(self.registry_error)
        version = self.alias_version
        if version is not None and version in self.refused and (current is None or current.version != version):
            reasons.append(f"alias {self.alias!r} points at {version}, refused: {self.refused[version]}")
        return reasons

    def resolve(self) -> str | None:
        from inspection.registry import Registry

        return Registry(self.registry_root, product=self.product).alias(self.alias)

    def check(self, force: bool = False) -> str:
        """Bring the serving model in line with the alias. Returns 'unchanged', 'swapped', 'refused' or 'no_alias'."""
        with self._lock:
            mtime = self._aliases_mtime()
            changed = mtime != self._last_mtime
            if changed and not isinstance(mtime, str):
                self.refused.clear()  # a new promotion (even of a refused version) deserves a new try
            self._last_mtime = mtime
            self._last_attempt = time.monotonic()
            current = self.holder.current
            try:
                if isinstance(mtime, str):
                    raise OSError(mtime)
                version = self.resolve()
            except Exception as exc:  # a registry mid-write or unreadable: keep serving, try again later
                self.last_error = f"alias {self.alias!r} could not be read: {exc}"
                self._registry_unreadable(f"registry {self.root} cannot be read ({exc})", current)
                return "refused"
            if version is None:
                self.last_error = f"registry {self.root} has no {self.alias!r} alias"
                if current is None:
                    logger.warning("%s: not ready", self.last_error)
                else:  # a serving runner whose alias vanished: the share is gone (or someone removed it)
                    if not self.root.is_dir():
                        why = f"registry folder {self.root} is not there (share unmounted or moved?)"
                    elif not (self.root / ALIASES_FILE).is_file():
                        why = f"registry {self.root} has no {ALIASES_FILE} (an empty mount point?)"
                    else:
                        why = f"registry {self.root}: alias {self.alias!r} points at no version"
                    self._registry_unreadable(why, current)
                return "no_alias"
            if self.registry_error is not None:
                logger.warning("hot swap: registry %s readable again (alias %s -> %s)", self.root, self.alias, version)
            self.registry_error = None
            self.alias_version = version
            if current is not None and current.version == version:
                self.last_error = None
                return "unchanged"
            if version in self.refused and not force:
                return "refused"
            logger.info(
                "hot swap (product %s): %s -> %s: loading, verifying and warming in the background",
                self.product,
                current.version if current else None,
                version,
            )
            try:
                new = self._load(version)
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, this version must not serve
                why = f"{type(exc).__name__}: {exc}"
                self.refused[version] = why
                self.last_error = f"version {version} refused: {why}"
                logger.error(
                    "hot swap (product %s): version %s REFUSED (%s); still serving %s",
                    self.product,
                    version,
                    why,
                    current.version if current else "nothing",
                )
                if self.metrics is not None:
                    self.metrics.swap_outcome(self.product, "refused")
                    self.metrics.errors.labels("model_load").inc()
                return "refused"
            old = self.holder.swap(new)
            self.last_error = None
            if self.metrics is not None:
                self.metrics.swap_outcome(self.product, "swapped")
                self.metrics.set_model(new.version, new.provider, self.alias, self.product)
            logger.info(
                "hot swap (product %s): now serving %s on %s (was %s)",
                self.product,
                new.version,
                new.provider,
                old.version if old else None,
            )
            return "swapped"

    def _registry_unreadable(self, why: str, current: Inferencer | None) -> None:
        if self.registry_error != why:  # log once per state, not once per poll
            logger.error("hot swap: %s; still serving %s", why, current.version if current else "nothing")
        self.registry_error = why
        if self.metrics is not None:
            self.metrics.errors.labels("registry").inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                due = self._aliases_mtime() != self._last_mtime or (
                    (self.holder.current is None or self.registry_error is not None)
                    and time.monotonic() - self._last_attempt > NO_MODEL_RETRY_S
                )
                if due:
                    self.check()
            except Exception:  # the watcher must survive anything; the old model keeps serving
                logger.exception("hot swap check failed")
            self._stop.wait(self.poll_s)

    def start(self, initial: bool = True) -> None:
        if initial:
            self.check()
        self._thread = threading.Thread(target=self._run, name=f"hot-swap-{self.product}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
