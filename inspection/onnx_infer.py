"""Torch-free inference on an exported model: what the runner and the registry gate use.

The exported graph takes raw uint8 camera frames (N, H, W, 3) and does the resize and normalisation itself,
so this wrapper only checks the batch, runs onnxruntime and returns (defect probabilities, heatmaps).

Execution providers are chosen by trying them: onnxruntime-gpu lists TensorRT and CUDA as "available" on any
machine (the list is fixed at build time), and asking for CUDA without a GPU silently falls back to CPU. So we
create a session with each preferred provider in turn, run a smoke inference, and read back what really runs
from `session.get_providers()`.

Every load checks the model file's sha256: against `expected_sha256` when given, otherwise against the
`model_card.json` beside the file when that card lists the file. A mismatch raises `IntegrityError`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inspection.errors import ConfigError, IntegrityError
from inspection.schemas import ModelCard, Thresholds

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
INPUT_NAME = "images"
OUTPUT_NAMES = ("defect_prob", "heatmap")
TYPE_OUTPUT = "defect_type_probs"  # a third output of models that learned defect types: (N, T), the card names them


def output_names(typed: bool) -> tuple[str, ...]:
    return (*OUTPUT_NAMES, TYPE_OUTPUT) if typed else OUTPUT_NAMES


CARD_FILE = "model_card.json"
_SMOKE_SIZE = 64  # smallest frame the smoke inference feeds; big enough for a stride-32 backbone


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("onnxruntime is missing: pip install 'inspection[runner]'") from exc
    return ort


def _session_options(threads: int | None, quiet: bool, allow_spinning: bool = True, spin_between_runs: bool = True):
    ort = _ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if not allow_spinning:
        # Idle intra-op threads busy-wait for work by default; on a box shared with other processes that steals
        # the cores the next inference needs (measured: batch-1 latency 13 -> 8.5 ms on a loaded 2-core box).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not spin_between_runs:
        # spin inside a run (fast hand-offs between the many small operators) but stop when it returns, so the
        # HTTP side gets the cores between parts (measured: 5.2 ms at 1.1 cores vs 4.9 ms at 1.55 / 6.2 ms at 1.1)
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        so.log_severity_level = 3
    return so


@contextlib.contextmanager
def _quiet_ort():
    """Probing a GPU provider on a machine without one prints errors (C++ log and a Python print); hide them."""
    ort = _ort()
    captured = io.StringIO()
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        ort.set_default_logger_severity(2)
        if captured.getvalue().strip():
            logger.debug("onnxruntime while probing providers: %s", captured.getvalue().strip())


def _maybe_preload_gpu_libs(prefer: Sequence[str]) -> None:
    # CUDA libraries may come from pip's nvidia-* wheels; only worth the attempt where a driver is present.
    if not any(p in prefer for p in DEFAULT_PROVIDERS[:2]) or not Path("/dev/nvidiactl").exists():
        return
    ort = _ort()
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - best effort; the provider probe decides
            logger.debug("onnxruntime.preload_dlls failed: %s", exc)


# A two-node graph (Cast uint8 -> float, ReduceMean) with our input name, for choosing providers without a real
# model file; embedded as bytes so that the runner needs neither torch nor the onnx package.
_SMOKE_MODEL_B64 = (
    "CAk6rAEKHAoGaW1hZ2VzEgFmIgRDYXN0KgkKAnRvGAGgAQIKMwoBZgoEYXhlcxILZGVmZWN0X3Byb2IiClJlZHVjZU1lYW4qDwoIa2VlcGRpbX"
    "MYAKABAhIFc21va2UqDwgDEAc6AwECA0IEYXhlc1ojCgZpbWFnZXMSGQoXCAISEwoDEgFOCgMSAUgKAxIBVwoCCANiGgoLZGVmZWN0X3Byb2IS"
    "CwoJCAESBQoDEgFOQgQKABAS"
)


def _smoke_model_bytes() -> bytes:
    return base64.b64decode(_SMOKE_MODEL_B64)


def _try_provider(
    model: bytes,
    provider: str,
    threads: int | None,
    provider_options: dict[str, Any] | None,
    allow_spinning: bool = True,
    spin_between_runs: bool = True,
):
    """A session that really runs `provider` (smoke inference done), or None with the reason logged."""
    ort = _ort()
    providers: list[Any] = [(provider, provider_options or {})] if provider_options else [provider]
    try:
        with _quiet_ort():
            session = ort.InferenceSession(
                model,
                sess_options=_session_options(threads, True, allow_spinning, spin_between_runs),
                providers=providers,
            )
            active = session.get_providers()
            if not active or active[0] != provider:
                logger.info("provider %s not usable here (onnxruntime fell back to %s)", provider, active)
                return None
            session.run(None, {INPUT_NAME: np.zeros((1, _SMOKE_SIZE, _SMOKE_SIZE, 3), dtype=np.uint8)})
    except Exception as exc:  # noqa: BLE001 - any failure means "this provider does not work here"
        logger.info("provider %s not usable here: %s", provider, str(exc).splitlines()[0][:200])
        return None
    return session


def select_providers(
    prefer: Sequence[str] = DEFAULT_PROVIDERS, model: str | Path | bytes | None = None, threads: int | None = None
) -> list[str]:
    """The preferred providers that really work here, in order (CPU always last as the fallback).

    Each one is tried by creating a session and running a smoke inference, on `model` when given (a provider may
    load but fail on a real graph) or on a tiny built-in graph.
    """
    _maybe_preload_gpu_libs(prefer)
    data = Path(model).read_bytes() if isinstance(model, str | Path) else model
    if data is None:
        data = _smoke_model_bytes()
    working = [p for p in prefer if p != "CPUExecutionProvider" and _try_provider(data, p, threads, None)]
    working.append("CPUExecutionProvider")
    return working


class OnnxModel:
    """An exported inspection model, loaded with an integrity check and the best provider that really runs.

    `.predict(uint8 (N, H, W, 3)) -> (probs (N,), heatmaps (N, h, w))`; `.card` is the ModelCard (from the
    verified `model_card.json` beside the file when present, else from the model's metadata); `.provider` is the
    execution provider in use. `allow_spinning=False` stops idle intra-op threads from busy-waiting (better
    latency when other processes share the cores; onnxruntime's default spins); `spin_between_runs=False` keeps
    the spinning inside a run and stops it when the run returns.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        expected_sha256: str | None = None,
        provider_options: dict[str, dict[str, Any]] | None = None,
        allow_spinning: bool = True,
        spin_between_runs: bool = True,
        busy_threads: int | None = None,
    ):
        self.path = Path(path)
        self.allow_spinning = allow_spinning
        if not self.path.is_file():
            raise ConfigError(f"model file not found: {self.path}")
        data = self.path.read_bytes()  # hash exactly the bytes we load: no window to swap the file
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._check_integrity(expected_sha256)
        prefer = list(providers) if providers else list(DEFAULT_PROVIDERS)
        _maybe_preload_gpu_libs(prefer)
        session = None
        for provider in prefer:
            if provider == "CPUExecutionProvider":
                break
            session = _try_provider(
                data, provider, threads, (provider_options or {}).get(provider), allow_spinning, spin_between_runs
            )
            if session is not None:
                break
        if session is None:
            ort = _ort()
            try:
                session = ort.InferenceSession(
                    data,
                    sess_options=_session_options(threads, False, allow_spinning, spin_between_runs),
                    providers=["CPUExecutionProvider"],
                )
            except Exception as exc:
                raise ConfigError(f"{self.path} is not a loadable ONNX model: {exc}") from exc
        self.session = session
        self.provider: str = session.get_providers()[0]
        # CPU under load: a second session, `busy_threads` threads and no spinning, so that concurrent batches run
        # side by side on their own cores instead of fighting over one session's threads (`predict(busy=True)`)
        self.busy_session = None
        if busy_threads and self.provider == "CPUExecutionProvider":
            self.busy_session = _ort().InferenceSession(
                data, sess_options=_session_options(busy_threads, True, False), providers=["CPUExecutionProvider"]
            )
        self._check_io()
        meta = session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        self.embedded_card = ModelCard.model_validate_json(meta["model_card"]) if "model_card" in meta else None
        sidecar = self._sidecar_card()
        self.card: ModelCard | None = sidecar if sidecar is not None else self.embedded_card
        logger.info(
            "loaded %s (sha256 %s…, provider %s, version %s)",
            self.path,
            self.sha256[:12],
            self.provider,
            self.card.version if self.card else "?",
        )

    # -- integrity --------------------------------------------------------------------------------------------
    def _sidecar_files(self) -> dict[str, str] | None:
        card_path = self.path.parent / CARD_FILE
        if not card_path.is_file():
            return None
        try:
            files = json.loads(card_path.read_text()).get("files") or {}
        except (OSError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{card_path} cannot be read as JSON ({exc}); refusing to load {self.path}") from exc
        return files

    def _check_integrity(self, expected: str | None) -> None:
        if expected is None:
            files = self._sidecar_files()
            expected = files.get(self.path.name) if files else None
            source = f"{self.path.parent / CARD_FILE}"
        else:
            source = "the caller"
        if expected is not None and expected.lower() != self.sha256:
            raise IntegrityError(
                f"{self.path} has sha256 {self.sha256}, but {source} expects {expected}: the file was changed or "
                "corrupted; refusing to load it"
            )

    def _sidecar_card(self) -> ModelCard | None:
        card_path = self.path.parent / CARD_FILE
        if not card_path.is_file():
            return None
        card = ModelCard.model_validate_json(card_path.read_text())
        return card if self.path.name in card.files else None

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or tuple(outputs) not in (OUTPUT_NAMES, output_names(True)):
            raise ConfigError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; an inspection model has input "
                f"{INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)} (+ {TYPE_OUTPUT!r} with defect types)"
            )
        self.typed = len(outputs) == 3

    # -- inference --------------------------------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        return self.card.version if self.card else None

    @property
    def thresholds(self) -> Thresholds | None:
        return self.card.thresholds if self.card else None

    @property
    def type_names(self) -> list[str]:
        """The defect types the model answers (empty for an ok/defect model)."""
        return list(self.card.defect_types) if self.card is not None and self.typed else []

    def predict(self, batch: np.ndarray, busy: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, 3) RGB frames, any H and W -> (defect probabilities (N,), heatmaps (N, h, w)).

        `busy=True` (other batches are running or waiting) uses the busy session when there is one."""
        probs, heatmaps, _ = self.predict_with_types(batch, busy)
        return probs, heatmaps

    def predict_with_types(
        self, batch: np.ndarray, busy: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """As `predict`, plus the defect-type probabilities (N, T) of a typed model (None otherwise)."""
        batch = np.asarray(batch)
        if batch.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (raw camera pixels), got {batch.dtype}")
        if batch.ndim == 4 and batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)  # grey camera: replicate, as decode_image does
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[0] == 0:
            raise ValueError(f"images must have shape (N, H, W, 3) with N >= 1, got {batch.shape}")
        session = self.busy_session if busy and self.busy_session is not None else self.session
        outs = session.run(list(output_names(self.typed)), {INPUT_NAME: np.ascontiguousarray(batch)})
        types = outs[2].astype(np.float32, copy=False) if self.typed else None
        return outs[0].astype(np.float32, copy=False), outs[1].astype(np.float32, copy=False), types

    def predict_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> tuple[np.ndarray, list]:
        """Images of possibly different sizes -> (probs (N,), list of heatmaps); batches images of equal shape."""
        probs = np.zeros(len(images), dtype=np.float32)
        heatmaps: list = [None] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                p, h = self.predict(np.stack([images[i] for i in chunk]))
                probs[chunk] = p
                for j, i in enumerate(chunk):
                    heatmaps[i] = h[j]
        return probs, heatmaps


def default_threads() -> int:
    """Intra-op threads when none are configured: all cores, as onnxruntime would, but at least 1."""
    return max(1, os.cpu_count() or 1)
