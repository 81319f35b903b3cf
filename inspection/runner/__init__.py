"""The line-side runner: verdict per part over HTTP, folder and MQTT; every decision logged; no torch.

`create_app(config)` gives the FastAPI app, `run_runner(config)` serves it (blocking). See runtime.py for the
fail-closed rules and the decision path, products.py for serving several products side by side, batcher.py for
micro-batching and hotswap.py for model swaps.
"""

from inspection.runner.config import RunnerConfig
from inspection.runner.runtime import Runtime
from inspection.runner.service import create_app, run_runner

__all__ = ["RunnerConfig", "Runtime", "create_app", "run_runner"]
