"""`inspection review user|export|serve|demo-data` and the labelled-folder export."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inspection.cli import main as cli_main
from inspection.config import load_config
from inspection.decisions import DecisionStore
from inspection.review import ReviewConfig, run_review_export
from inspection.review import queries as q
from inspection.review.auth import Auth
from inspection.review.demo import seed_store

REPO_ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"
CHEAP = ["--set", "password_time_cost=1", "--set", "password_memory_kib=1024"]


@pytest.fixture
def seeded(tmp_path: Path):
    store = DecisionStore(tmp_path / "store")
    parts = [p for p in seed_store(store, n=5, seed=4, now=datetime(2024, 5, 6, tzinfo=UTC)) if p.verdict != "pass"]
    yield store, [p.request_id for p in parts]
    store.close()


def test_user_add_from_stdin_list_and_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    store_dir = str(tmp_path / "store")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert (
        cli_main(["review", "user", "add", "adam", "--role", "admin", "--password-stdin", "--store", store_dir, *CHEAP])
        == 0
    )
    auth = Auth(DecisionStore(store_dir).engine)
    user = auth.authenticate("adam", PASSWORD)  # the trailing newline is not part of the password
    assert user is not None and user.is_admin

    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert cli_main(["review", "user", "add", "adam", "--password-stdin", "--store", store_dir, *CHEAP]) == 1
    assert "already exists" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli_main(["review", "user", "add", "bea", "--password-stdin", "--store", store_dir, *CHEAP]) == 1
    assert "at least 10" in capsys.readouterr().err

    capsys.readouterr()
    assert cli_main(["review", "user", "list", "--store", store_dir]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(u["username"], u["role"], u["active"]) for u in listed] == [("adam", "admin", True)]

    assert cli_main(["review", "user", "disable", "adam", "--store", store_dir]) == 0
    assert auth.get_user("adam").active is False
    assert cli_main(["review", "user", "add", "x", "--password-stdin"]) == 1  # no store given
    assert "--store" in capsys.readouterr().err


def test_export_writes_a_labelled_folder_and_replaces_a_previous_export(seeded, tmp_path: Path, capsys) -> None:
    store, ids = seeded
    q.record_decision(store, ids[0], "confirm_defect", "ann", defect_type="crack")
    q.record_decision(store, ids[1], "override_ok", "ann")
    q.record_decision(store, ids[2], "confirm_defect", "ann")
    out = tmp_path / "labelled"
    assert cli_main(["review", "export", "--store", str(store.media_dir), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "defect": 2, "ok": 1, "missing": 0}
    sha = {rid: store.get_row(rid)["image_sha256"] for rid in ids}
    assert sorted(p.stem for p in (out / "def_front").iterdir()) == sorted([sha[ids[0]], sha[ids[2]]])
    assert [p.stem for p in (out / "ok_front").iterdir()] == [sha[ids[1]]]
    copied = out / "ok_front" / f"{sha[ids[1]]}.png"
    assert copied.read_bytes() == (store.media_dir / store.get_row(ids[1])["image_path"]).read_bytes()
    with open(out / "review_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["sha256"], r["label"], r["reviewer"]) for r in rows} == {
        (sha[ids[0]], "defect", "ann"),
        (sha[ids[1]], "ok", "ann"),
        (sha[ids[2]], "defect", "ann"),
    }

    # an undo and a changed mind: the next export holds exactly the current labels
    q.undo_decision(store, "ann", request_id=ids[2])
    q.record_decision(store, ids[0], "override_ok", "bob")
    result = run_review_export(ReviewConfig(store=str(store.media_dir)), out)
    assert (result.n_defect, result.n_ok) == (0, 2)
    assert list((out / "def_front").iterdir()) == []
    assert sorted(p.stem for p in (out / "ok_front").iterdir()) == sorted([sha[ids[0]], sha[ids[1]]])
    assert not list(tmp_path.glob(".labelled*"))  # no temporary folders left behind


def test_export_refuses_a_folder_with_other_files_and_counts_missing_images(seeded, tmp_path: Path, capsys) -> None:
    store, ids = seeded
    q.record_decision(store, ids[0], "confirm_defect", "ann")
    q.record_decision(store, ids[1], "confirm_defect", "ann")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert cli_main(["review", "export", "--store", str(store.media_dir), "--out", str(precious)]) == 1
    assert "not a previous review export" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]

    (store.media_dir / store.get_row(ids[1])["image_path"]).unlink()
    result = run_review_export(ReviewConfig(), tmp_path / "out", store=store)
    assert result.n_written == 1 and result.missing == [store.get_row(ids[1])["image_sha256"]]


def test_serve_builds_the_app_from_config_and_flags(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_run(app, host, port, log_level):
        seen.update(app=app, host=host, port=port)

    monkeypatch.setattr("uvicorn.run", fake_run)
    config = REPO_ROOT / "configs" / "review.yaml"
    store_dir = tmp_path / "store"
    assert cli_main(["review", "serve", "--store", str(store_dir), "--config", str(config), "--port", "8765"]) == 0
    assert seen["port"] == 8765 and seen["host"] == "127.0.0.1"
    assert seen["app"].state.config.store == str(store_dir)
    assert (store_dir / "decisions.sqlite").is_file()


def test_shipped_config_loads_with_the_dataclass_defaults() -> None:
    config = load_config(ReviewConfig, REPO_ROOT / "configs" / "review.yaml")
    assert config == ReviewConfig()


def test_demo_data_fills_a_store(tmp_path: Path, capsys) -> None:
    assert cli_main(["review", "demo-data", "--store", str(tmp_path / "s"), "--n", "4", "--n-pass", "2"]) == 0
    assert json.loads(capsys.readouterr().out) == {"parts": 6, "flagged": 4}
    assert q.count_waiting(DecisionStore(tmp_path / "s")) == 4
