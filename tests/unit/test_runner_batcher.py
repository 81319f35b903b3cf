"""Micro-batcher and hot-swap logic with contract-shaped fake models (no onnxruntime needed)."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from inspection.runner.batcher import MicroBatcher, NoModelError, OverloadedError
from inspection.runner.hotswap import HotSwapper, ModelHolder
from inspection.runner.inferencer import Inferencer, ModelRejectedError
from tests.fixtures.serving import FakeModel, fake_card, fake_inferencer, sample_frame


def test_queued_frames_share_one_call_up_to_max_batch():
    holder = ModelHolder()
    holder.swap(fake_inferencer())
    b = MicroBatcher(lambda: holder.current, max_batch_size=4, max_wait_ms=0)
    # queue before the worker runs: the first batches must be full
    b._running = True
    futures = [b.submit(sample_frame(v)) for v in range(10)]
    b._running = False
    b.start()
    preds = [f.result(5) for f in futures]
    b.stop()
    assert holder.current.model.batch_sizes == [4, 4, 2]
    assert [p.score for p in preds] == pytest.approx([sample_frame(v).mean() / 255 for v in range(10)], abs=1e-5)


def test_finish_hook_sees_only_frames_with_a_context_and_its_failure_stays_with_them():
    holder = ModelHolder()
    holder.swap(fake_inferencer())
    calls: list[list[str]] = []
    fail = {"on": False}

    def finish(images, preds, contexts):
        calls.append(list(contexts))
        if fail["on"]:
            raise OSError("store down")
        return [(ctx, p.score) for ctx, p in zip(contexts, preds, strict=True)]

    b = MicroBatcher(lambda: holder.current, max_batch_size=8, max_wait_ms=0, finish=finish)
    b._running = True  # queue before the worker runs: one batch of three
    plain, a, c = b.submit(sample_frame(10)), b.submit(sample_frame(20), "a"), b.submit(sample_frame(30), "c")
    b._running = False
    b.start()
    assert plain.result(5).score == pytest.approx(
        sample_frame(10).mean() / 255, abs=1e-5
    )  # no context: the bare Prediction
    assert a.result(5) == ("a", pytest.approx(sample_frame(20).mean() / 255, abs=1e-5)) and c.result(5)[0] == "c"
    assert calls == [["a", "c"]]  # one call per batch
    fail["on"] = True
    with pytest.raises(OSError, match="store down"):
        b.submit(sample_frame(40), "d").result(5)
    assert b.submit(sample_frame(50)).result(5).score == pytest.approx(
        sample_frame(50).mean() / 255, abs=1e-5
    )  # the worker goes on
    b.stop()


def test_frames_of_different_shapes_in_one_batch():
    inf = fake_inferencer()
    frames = [sample_frame(10, 64, 64), sample_frame(200, 80, 40), sample_frame(30, 64, 64)]
    preds = inf.predict(frames)
    assert sorted(inf.model.batch_sizes) == [1, 2]  # grouped by shape, order of answers kept
    assert [p.score for p in preds] == pytest.approx([f.mean() / 255 for f in frames], abs=1e-5)


def test_failures_reach_every_caller_and_worker_survives():
    holder = ModelHolder()
    holder.swap(fake_inferencer(fail=True))
    b = MicroBatcher(lambda: holder.current, max_batch_size=8)
    b.start()
    with pytest.raises(RuntimeError, match="fake model failure"):
        b.submit(sample_frame()).result(5)
    holder.swap(fake_inferencer("fake-2"))
    assert b.submit(sample_frame()).result(5).version == "fake-2"
    holder.current = None
    with pytest.raises(NoModelError):
        b.submit(sample_frame()).result(5)
    b.stop()
    with pytest.raises(NoModelError):
        b.submit(sample_frame())


def test_queue_limit_and_cancelled_frames():
    holder = ModelHolder()
    gate = threading.Event()

    class Blocking(FakeModel):
        def predict(self, batch, busy=False):
            gate.wait(5)
            return super().predict(batch)

    holder.swap(Inferencer(Blocking(), "v", fake_card("v"), "x.onnx"))
    b = MicroBatcher(lambda: holder.current, max_batch_size=1, queue_limit=2)
    b.start()
    first = b.submit(sample_frame())
    time.sleep(0.2)  # the worker now blocks inside the model with `first`
    queued = [b.submit(sample_frame()), b.submit(sample_frame())]
    with pytest.raises(OverloadedError):
        b.submit(sample_frame())
    queued[0].cancel()  # its caller timed out: the model must not spend time on it
    gate.set()
    assert first.result(5).score >= 0 and queued[1].result(5).score >= 0
    b.stop()
    assert sum(holder.current.model.batch_sizes) == 2


def test_model_read_once_per_batch_so_swaps_land_between_batches():
    holder = ModelHolder()
    holder.swap(fake_inferencer("old", delay_s=0.05))
    b = MicroBatcher(lambda: holder.current, max_batch_size=32, max_wait_ms=0)
    b.start()
    futures = []
    for i in range(40):
        futures.append(b.submit(sample_frame(i)))
        if i == 20:
            holder.swap(fake_inferencer("new"))
        time.sleep(0.002)
    preds = [f.result(10) for f in futures]
    b.stop()
    versions = [p.version for p in preds]
    assert versions[0] == "old" and versions[-1] == "new"
    assert versions == sorted(versions, key=lambda v: v == "new")  # never back to old once new serves


def _registry_with_alias(root, version):
    root.mkdir(exist_ok=True)
    (root / "aliases.json").write_text(json.dumps({"production": version}))
    st = (root / "aliases.json").stat()
    # distinct mtimes even on coarse filesystems
    bump = getattr(_registry_with_alias, "n", 0) + 1
    _registry_with_alias.n = bump
    os.utime(root / "aliases.json", ns=(st.st_atime_ns, st.st_mtime_ns + bump * 10_000_000))


def test_hot_swapper_swaps_refuses_broken_and_keeps_serving(tmp_path):
    holder = ModelHolder()
    loads = []

    def loader(version: str):
        loads.append(version)
        if version == "broken":
            raise ModelRejectedError("smoke inference failed")
        return fake_inferencer(version)

    sw = HotSwapper(tmp_path / "reg", holder, poll_s=0.05, loader=loader)
    sw.resolve = lambda: json.loads((tmp_path / "reg" / "aliases.json").read_text())["production"]
    _registry_with_alias(tmp_path / "reg", "v1")
    assert sw.check() == "swapped" and holder.current.version == "v1" and holder.ready.is_set()
    assert sw.check() == "unchanged"
    _registry_with_alias(tmp_path / "reg", "broken")
    assert sw.check() == "refused" and holder.current.version == "v1"
    assert "broken" in sw.refused and "smoke" in sw.last_error
    assert sw.check() == "refused" and loads.count("broken") == 1  # not retried until the alias changes
    _registry_with_alias(tmp_path / "reg", "v2")
    sw.start(initial=False)
    deadline = time.time() + 5
    while holder.current.version != "v2" and time.time() < deadline:
        time.sleep(0.02)
    sw.stop()
    assert holder.current.version == "v2"


def test_smoke_test_rejects_out_of_contract_outputs():
    class Nan(FakeModel):
        def predict(self, batch, busy=False):
            p, h = super().predict(batch)
            return p * np.nan, h

    inf = Inferencer(Nan(), "nan", fake_card("nan"), "x.onnx")
    with pytest.raises(ModelRejectedError):
        inf.smoke_test()


def test_two_workers_run_two_batches_at_once_and_stop_cleanly():
    holder = ModelHolder()
    inside, release = threading.Semaphore(0), threading.Event()

    class Blocking(FakeModel):
        def __init__(self):
            super().__init__()
            self.busy_flags: list[bool] = []

        def predict(self, batch, busy=False):
            self.busy_flags.append(busy)
            inside.release()
            release.wait(5)
            return super().predict(batch)

    holder.swap(Inferencer(Blocking(), "v", fake_card("v"), "x.onnx"))
    b = MicroBatcher(lambda: holder.current, max_batch_size=1, max_wait_ms=0, workers=2)
    b.start()
    futures = [b.submit(sample_frame(10))]
    assert inside.acquire(timeout=5)  # the first batch is alone in the model
    futures += [b.submit(sample_frame(v)) for v in (20, 30)]
    assert inside.acquire(timeout=5)  # two model calls in flight together
    assert not inside.acquire(timeout=0.2)  # the third waits for a free worker
    release.set()
    assert [f.result(5).score for f in futures] == pytest.approx([sample_frame(v).mean() / 255 for v in (10, 20, 30)])
    b.stop()
    assert b.frames == 3 and b.batches == 3 and not b._threads
    # the first batch ran alone (latency session), the second while the first was in the model (busy session)
    assert holder.current.model.busy_flags[:2] == [False, True]
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(lambda: holder.current, workers=0)


def test_one_worker_never_trades_its_threads_for_the_busy_session():
    class Recording(FakeModel):
        def __init__(self):
            super().__init__()
            self.busy_flags: list[bool] = []

        def predict(self, batch, busy=False):
            self.busy_flags.append(busy)
            return super().predict(batch)

    holder = ModelHolder()
    holder.swap(Inferencer(Recording(), "v", fake_card("v"), "x.onnx"))
    b = MicroBatcher(lambda: holder.current, max_batch_size=1, max_wait_ms=0, workers=1)
    b._running = True
    futures = [b.submit(sample_frame(v)) for v in range(4)]  # a backlog, but nobody to run it alongside
    b._running = False
    b.start()
    [f.result(5) for f in futures]
    b.stop()
    assert holder.current.model.busy_flags == [False] * 4
