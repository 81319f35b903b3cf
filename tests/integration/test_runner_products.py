"""Two products served side by side by one runner, end to end: a real registry with a product per part type, real
ONNX models (`known_export` under product names), a real uvicorn server and concurrent HTTP clients. Product A is
promoted to a new version under load while B keeps serving; per-product rollback; no request fails."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from inspection.images import encode_png
from inspection.registry import Registry
from inspection.runner import Runtime, create_app
from inspection.runner.config import BatchingConfig, SwapConfig
from tests.fixtures.serving import sample_frame, serve_in_thread, version_copy

pytestmark = pytest.mark.timeout(300)

TOKEN = "two-products"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}


@pytest.fixture
def plant_registry(known_export: Path, tmp_path: Path) -> Path:
    """Products `impeller` (a-1 in production, a-2 registered) and `tile` (b-1 in production) in one folder."""
    root = tmp_path / "registry"
    a, b = Registry(root, product="impeller"), Registry(root, product="tile")
    for reg, version in ((a, "a-1"), (a, "a-2"), (b, "b-1")):
        reg.register(version_copy(known_export, tmp_path / version, version, product=reg.product))
    a.promote("a-1", reason="first", force=True)  # no golden set in this folder: the test is about serving
    b.promote("b-1", reason="first", force=True)
    return root


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_products_one_swapped_under_load_while_the_other_keeps_serving(plant_registry, registry_runner_config):
    cfg = registry_runner_config(
        plant_registry,
        TOKEN,
        station="line-2",
        product=None,  # every request names its product: nothing is judged by a guess
        products=("impeller", "tile"),
        swap=SwapConfig(poll_s=0.1),
        # a shared 2-core box may stall for seconds: this test is about the swap, not about the line's latency
        batching=BatchingConfig(timeout_s=30.0),
    )
    rt = Runtime.build(cfg)
    body = encode_png(sample_frame(120, 64, 64))
    stop = threading.Event()
    with serve_in_thread(create_app(cfg, rt)) as url:
        assert rt.wait_ready(120), {p: s.swapper.last_error for p, s in rt.slots.items()}
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["products"]["impeller"]["model_version"] == "a-1"
        assert ready["products"]["tile"]["model_version"] == "b-1"

        def client(k: int) -> list[tuple[str, int, dict]]:
            product = ("impeller", "tile")[k % 2]
            seen = []
            with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as h:
                i = 0
                while not stop.is_set():
                    r = h.post("/v1/inspect", content=body, params={"part_id": f"k{k}-{i}", "product": product})
                    seen.append((product, r.status_code, r.json()))
                    i += 1
            return seen

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client, k) for k in range(4)]
            time.sleep(0.5)
            Registry(plant_registry, product="impeller").promote("a-2", reason="new version under load", force=True)
            assert _wait(lambda: rt.slots["impeller"].holder.current.version == "a-2")
            time.sleep(0.5)  # keep the load on after the swap
            stop.set()
            answers = [a for f in futures for a in f.result()]
        # a rollback of one product reaches the runner and leaves the other alone
        assert Registry(plant_registry, product="impeller").rollback(reason="test: per product") == "a-1"
        assert _wait(lambda: rt.slots["impeller"].holder.current.version == "a-1")
        params = {"part_id": "r", "product": "tile"}
        after = httpx.post(f"{url}/v1/inspect", content=body, headers=HEADERS, params=params)
    failed = Counter((p, status, a.get("reason")) for p, status, a in answers if status != 200)
    assert not failed, f"failed requests while product impeller was swapped: {failed}"
    by_product = {p: [a for q, _, a in answers if q == p] for p in ("impeller", "tile")}
    assert {a["model_version"] for a in by_product["tile"]} == {"b-1"}  # B never saw A's swap
    assert {a["model_version"] for a in by_product["impeller"]} == {"a-1", "a-2"}
    assert all(a["product"] == p for p, items in by_product.items() for a in items)
    assert rt.store.count() == len(answers) + 1  # every request has its decision
    assert rt.store.get_row(by_product["tile"][0]["request_id"])["product"] == "tile"
    assert after.status_code == 200 and after.json()["model_version"] == "b-1"
    assert rt.slots["tile"].swapper.degraded_reasons() == []
