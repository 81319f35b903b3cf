"""The "same part, labels disagree" queue: an ingest store holding one physical part under both labels, shown
with its photos side by side; one decision relabels every photo of it, after which no conflict is left."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from inspection.cli import main as cli_main
from inspection.decisions import DecisionStore
from inspection.errors import DataError
from inspection.ingest import IngestConfig, label_conflicts, load_samples, run_ingest
from inspection.ingest.manifest import connect, manifest_path
from inspection.review import ReviewConfig, create_app
from inspection.review.conflicts import ConflictSource
from inspection.review.demo import write_mixed_label_folder

PASSWORD = "correct horse battery"


@pytest.fixture
def ingest_store(tmp_path: Path) -> Path:
    """6 synthetic parts photographed 3 times each (turned, mirrored); part 0 filed 1x defect + 2x ok."""
    write_mixed_label_folder(tmp_path / "drop", n_parts=6, copies=3, seed=1)
    run_ingest(IngestConfig(progress=False, workers=1), [tmp_path / "drop"], tmp_path / "ingest")
    return tmp_path / "ingest"


@pytest.fixture
def app(tmp_path: Path, ingest_store: Path):
    store = DecisionStore(tmp_path / "decisions")
    config = ReviewConfig(
        store=str(tmp_path / "decisions"),
        password_time_cost=1,
        password_memory_kib=1024,
        ingest_store=str(ingest_store),
    )
    app = create_app(config, store=store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    yield app
    store.close()


def test_the_ingest_store_holds_one_part_labelled_both_ways(ingest_store: Path) -> None:
    conflicts = label_conflicts(ingest_store)
    assert len(conflicts) == 1
    assert conflicts[0].counts == {"defect": 1, "ok": 2}
    assert len({s.group_id for s in load_samples(ingest_store)}) == 6  # one group per physical part


def test_the_queue_shows_the_part_with_its_photos_side_by_side(app, ingest_store: Path, review_login) -> None:
    client, _ = review_login(app, "rita", PASSWORD, "/conflicts")
    conflict = label_conflicts(ingest_store)[0]
    html = client.get("/queue").text
    assert 'data-testid="conflicts-total">1<' in html  # the top bar counts it on every page
    html = client.get("/conflicts").text
    assert 'data-testid="conflicts-count">1<' in html
    assert f'data-href="/conflicts/{conflict.group_id}"' in html
    page = client.get(f"/conflicts/{conflict.group_id}")
    assert page.status_code == 200
    assert page.text.count('data-testid="conflict-photo"') == 3
    assert "1 labelled defect" in page.text and "2 labelled ok" in page.text
    for sha, path, label in conflict.photos:
        assert f"/photos/{sha}?size=thumb" in page.text
        assert re.search(rf'alt="photo {sha[:12]}, labelled {label}"', page.text)
        full = client.get(f"/conflicts/{conflict.group_id}/photos/{sha}")
        assert full.status_code == 200 and full.content == Path(path).read_bytes()
        assert client.get(f"/conflicts/{conflict.group_id}/photos/{sha}?size=thumb").content[:3] == b"\xff\xd8\xff"
    assert client.get(f"/conflicts/{conflict.group_id}/photos/{'0' * 64}").status_code == 404
    assert client.get("/conflicts/g-unknown").status_code == 404


def test_one_decision_relabels_every_photo_and_empties_the_queue(
    app, ingest_store: Path, tmp_path: Path, review_login
) -> None:
    client, token = review_login(app, "rita", PASSWORD, "/conflicts")
    conflict = label_conflicts(ingest_store)[0]
    seen = re.search(r'name="seen" value="([^"]*)"', client.get(f"/conflicts/{conflict.group_id}").text).group(1)
    r = client.post(
        f"/conflicts/{conflict.group_id}/decision",
        data={"csrf_token": token, "label": "defect", "seen": seen},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/conflicts?msg=conflicts_empty"
    assert label_conflicts(ingest_store) == []
    photos = {s.sha256: s for s in load_samples(ingest_store) if s.group_id == conflict.group_id}
    assert len(photos) == 3 and {s.label for s in photos.values()} == {"defect"}
    with connect(manifest_path(ingest_store)) as con:
        rows = con.execute("SELECT sha256, label, reviewer FROM review_labels").fetchall()
    assert sorted(rows) == sorted((sha, "defect", "rita") for sha in photos)  # the session's user decided
    assert 'data-testid="conflicts-count">0<' in client.get("/conflicts").text
    # the next ingest of the same drop folder keeps the settled label: the part is one label for the retrain
    run_ingest(IngestConfig(progress=False, workers=1), [tmp_path / "drop"], ingest_store)
    assert label_conflicts(ingest_store) == []


def test_bad_or_stale_decisions_change_nothing(app, ingest_store: Path, review_login) -> None:
    client, token = review_login(app, "rita", PASSWORD, "/conflicts")
    group = label_conflicts(ingest_store)[0].group_id
    url = f"/conflicts/{group}/decision"
    assert client.post(url, data={"csrf_token": token, "label": "maybe"}).status_code == 400
    r = client.post(url, data={"csrf_token": token, "label": "ok", "seen": "abc"})  # the page showed other photos
    assert r.status_code == 400 and "changed since" in r.text
    assert client.post(url, data={"label": "ok"}).status_code == 403  # no CSRF token
    assert client.post("/conflicts/g-unknown/decision", data={"csrf_token": token, "label": "ok"}).status_code == 400
    assert len(label_conflicts(ingest_store)) == 1


def test_without_an_ingest_store_the_queue_says_how_to_get_one(tmp_path: Path, review_login) -> None:
    store = DecisionStore(tmp_path / "d")
    app = create_app(ReviewConfig(store=str(tmp_path / "d"), password_time_cost=1, password_memory_kib=1024), store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    client, token = review_login(app, "rita", PASSWORD, "/conflicts")
    assert "--ingest-store" in client.get("/conflicts").text
    assert 'data-testid="nav-conflicts"' not in client.get("/queue").text
    assert client.get("/conflicts/g1").status_code == 404
    assert client.post("/conflicts/g1/decision", data={"csrf_token": token, "label": "ok"}).status_code == 400
    assert client.get(f"/conflicts/g1/photos/{'0' * 64}").status_code == 404
    with pytest.raises(DataError, match="manifest.sqlite"):
        ConflictSource(tmp_path / "nothing")


def test_photos_outside_the_store_are_never_served(app, ingest_store: Path, tmp_path: Path, review_login) -> None:
    client, _ = review_login(app, "rita", PASSWORD, "/conflicts")
    conflict = label_conflicts(ingest_store)[0]
    sha = conflict.photos[0][0]
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"not for you")
    with connect(manifest_path(ingest_store)) as con:
        con.execute("UPDATE records SET stored_path = ? WHERE sha256 = ?", (str(outside), sha))
    app.state.web.conflicts._cached = None
    assert client.get(f"/conflicts/{conflict.group_id}/photos/{sha}").status_code == 404


def test_serve_takes_the_ingest_store_from_the_command_line(tmp_path: Path, ingest_store: Path, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, log_level: seen.update(app=app))
    args = ["review", "serve", "--store", str(tmp_path / "s"), "--ingest-store", str(ingest_store)]
    assert cli_main(args) == 0
    assert seen["app"].state.config.ingest_store == str(ingest_store)
    assert seen["app"].state.web.conflicts.count() == 1
