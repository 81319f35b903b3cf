"""Folder mode: each dropped file inspected exactly once (also across restarts and crashes), JSON lines, moves."""

from __future__ import annotations

import json
import os
import time

import pytest

from inspection.decisions import DecisionStore
from inspection.images import encode_jpeg, encode_png
from inspection.runner import RunnerConfig, Runtime
from inspection.runner.config import AuthConfig, FolderConfig
from inspection.schemas import InspectionResult
from tests.fixtures.serving import fake_inferencer, sample_frame


def _runtime(tmp_path, drop, settle=0.0) -> Runtime:
    cfg = RunnerConfig(
        store=str(tmp_path / "store"),
        station="st-f",
        auth=AuthConfig(required=False),
        folder=FolderConfig(watch=drop, poll_s=0.05, settle_s=settle),
    )
    rt = Runtime.build(cfg)
    rt.holder.swap(fake_inferencer())
    rt.batcher.start()
    return rt


def _drop(folder, name, data, age_s=5.0):
    path = folder / name
    path.write_bytes(data)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def _lines(drop):
    path = drop / "results.jsonl"
    return [InspectionResult.model_validate_json(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_folder_inspects_moves_and_flags(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    rt = _runtime(tmp_path, drop)
    try:
        _drop(drop, "ok1.jpg", encode_jpeg(sample_frame(10)))
        _drop(drop, "bad1.png", encode_png(sample_frame(250)))
        _drop(drop, "broken.jpg", b"\xff\xd8\xff\xe0 truncated")
        _drop(drop, ".hidden.jpg", encode_jpeg(sample_frame(10)))
        _drop(drop, "writing.jpg.part", b"...")
        _drop(drop, "fresh.jpg", encode_jpeg(sample_frame(10)), age_s=-60)  # still being written
        assert rt.folder.scan_once() == 3
    finally:
        rt.stop()
    by_part = {r.part_id: r for r in _lines(drop)}
    assert set(by_part) == {"ok1", "bad1", "broken"}
    assert by_part["ok1"].verdict == "pass" and by_part["bad1"].verdict == "reject"
    assert by_part["broken"].verdict == "review" and by_part["broken"].reason.startswith("truncated")
    assert (drop / "processed" / "ok1.jpg").is_file() and (drop / "processed" / "bad1.png").is_file()
    assert (drop / "flagged" / "broken.jpg").is_file()
    sidecar = json.loads((drop / "flagged" / "broken.jpg.reason.json").read_text())
    assert sidecar["reason"].startswith("truncated")
    assert (drop / ".hidden.jpg").exists() and (drop / "writing.jpg.part").exists() and (drop / "fresh.jpg").exists()
    store = DecisionStore(tmp_path / "store")
    for r in by_part.values():
        row = store.get_row(r.request_id)
        assert row["source"] == "folder" and row["verdict"] == r.verdict


@pytest.mark.parametrize("crash_in", ["_emit", "_move"])
def test_exactly_once_after_a_crash_between_steps(tmp_path, monkeypatch, crash_in):
    drop = tmp_path / "drop"
    drop.mkdir()
    _drop(drop, "a.jpg", encode_jpeg(sample_frame(250)))
    rt = _runtime(tmp_path, drop)
    from inspection.runner.folder import FolderWatcher

    original = getattr(FolderWatcher, crash_in)

    def crash(self, *a, **k):  # the process dies right there (after the decision is stored)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(FolderWatcher, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        rt.folder.handle(drop / "a.jpg")
    rt.stop()
    monkeypatch.setattr(FolderWatcher, crash_in, original)
    assert (drop / "a.jpg").exists()  # crashed before the move

    rt2 = _runtime(tmp_path, drop)
    try:
        rt2.folder.scan_once()
        assert rt2.folder.inspected == 0  # recovered from the store, not inspected again
        assert rt2.holder.current.model.batch_sizes == []
    finally:
        rt2.stop()
    lines = _lines(drop)
    assert len(lines) == 1 and lines[0].verdict == "reject"
    assert (drop / "processed" / "a.jpg").is_file() and not (drop / "a.jpg").exists()
    assert rt2.store.count() == 1


def test_exactly_once_across_a_restart_of_the_watcher_thread(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    names = [f"p{i}.jpg" for i in range(6)]
    for n in names[:3]:
        _drop(drop, n, encode_jpeg(sample_frame(10)))
    rt = _runtime(tmp_path, drop)
    rt.folder.start()
    deadline = time.time() + 20
    while len(_lines(drop)) < 3 and time.time() < deadline:
        time.sleep(0.05)
    rt.stop()
    # same content, same names dropped again (a camera re-sending) + new files
    for n in names[:3]:
        _drop(drop, n, encode_jpeg(sample_frame(10)))
    for n in names[3:]:
        _drop(drop, n, encode_jpeg(sample_frame(250)))
    rt2 = _runtime(tmp_path, drop)
    rt2.folder.start()
    deadline = time.time() + 20
    while any((drop / n).exists() for n in names) and time.time() < deadline:
        time.sleep(0.05)
    rt2.stop()
    lines = _lines(drop)
    assert sorted(r.part_id for r in lines) == sorted(n[:-4] for n in names)  # one line per file, no repeats
    assert rt2.folder.inspected == 3 and rt2.store.count() == 6
