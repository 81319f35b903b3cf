"""The line-side runner: verdict per part over HTTP, folder and MQTT; every decision logged; no torch.

`create_app(config)` gives the FastAPI app, `run_runner(config)` serves it (blocking). See service.py for the
fail-closed rules, batcher.py for micro-batching and hotswap.py for model swaps.
"""

from inspection.runner.config import RunnerConfig
from inspection.runner.service import Runtime, create_app, run_runner

__all__ = ["RunnerConfig", "Runtime", "create_app", "run_runner"]
