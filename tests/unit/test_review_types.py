"""Defect types in the review app (issue #16 item 5): the part page pre-selects the model's type with its
probability, the choices are the model's own types then QA's enum, and the statistics set QA's confirmed types
against the predicted ones."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from inspection.decisions import DecisionStore
from inspection.images import encode_png
from inspection.review import ReviewConfig, create_app, parts
from inspection.review import queries as q
from inspection.review.stats import NO_PREDICTION, OVERRIDDEN, UNSPECIFIED, compute_stats, stats_summary
from inspection.schemas import InspectionResult, Thresholds, Verdict
from tests.unit.test_review_app import PASSWORD, login

NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def _photo(store: DecisionStore, rid: str, kind: str | None, p: float | None = None, minutes: int = 0, **kw) -> None:
    """A flagged photo as the runner records it (its own part), the model's type and probability included."""
    image = encode_png(np.full((48, 48, 3), 40 + 3 * len(rid) + minutes, np.uint8))
    result = InspectionResult(
        request_id=rid,
        part_id=kw.get("part_id", f"part-{rid}"),
        station="line-1",
        timestamp=NOW + timedelta(minutes=minutes),
        verdict=kw.get("verdict", Verdict.reject),
        defect_score=kw.get("score", 0.9),
        thresholds=Thresholds(reject=0.6, review=0.3),
        model_version=kw.get("model_version", "v-typed"),
        latency_ms=4.0,
        defect_type=kind,
        defect_type_probability=p,
    )
    store.record_inspection(result, image, np.zeros((4, 4), np.float32), "http")


@pytest.fixture
def typed_app(tmp_path: Path):
    store = DecisionStore(tmp_path / "store")
    _photo(store, "a1", "cold_shut", 0.83)  # a plant's own type name, answered by its typed model
    _photo(store, "a2", "crack", 0.55, minutes=1)
    _photo(store, "a3", None, minutes=2, model_version="v-plain")  # a model without types
    config = ReviewConfig(store=str(tmp_path / "store"), password_time_cost=1, password_memory_kib=1024)
    app = create_app(config, store=store)
    app.state.auth.add_user("rita", PASSWORD, "reviewer")
    yield app, store
    store.close()


def _checked(html: str) -> list[str]:
    return re.findall(r'name="defect_type" value="([^"]*)"\s*(?:data-key="\d"\s*)?checked', html)


def _choices(html: str) -> list[str]:
    return [v for v in re.findall(r'name="defect_type" value="([^"]*)"', html) if v]


def test_part_page_preselects_the_predicted_type_with_its_probability_and_qa_can_change_it(typed_app) -> None:
    app, store = typed_app
    client, token = login(app)
    html = client.get("/parts/a1").text
    assert _checked(html) == ["cold_shut"]  # the model's guess, pre-selected
    assert re.search(r'data-testid="predicted-type">cold shut\s*<span class="muted">83.0 %', html)
    # the model's own types first (those the store holds for its version), then QA's enum
    assert _choices(html) == ["cold_shut", "crack", "blowhole", "burr_flash", "shrinkage", "other"]
    assert _checked(client.get("/parts/a3").text) == [""]  # no type predicted: "none" stays selected
    assert "predicted-type" not in client.get("/parts/a3").text
    items = {i["request_id"]: i for i in client.get("/api/queue").json()["items"]}
    assert (items["a1"]["predicted_type"], items["a1"]["predicted_type_probability"]) == ("cold_shut", 0.83)
    r = client.post(
        "/parts/a1/decision",
        data={"csrf_token": token, "action": "confirm_defect", "defect_type": "crack", "expected": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303
    html = client.get("/parts/a1").text
    assert _checked(html) == ["crack"]  # once decided, the page shows QA's type, not the model's
    (label,) = q.reviewed_labels(store)
    assert (label.label, label.defect_type) == ("defect", "crack")
    bad = client.post(
        "/parts/a2/decision",
        data={"csrf_token": token, "action": "confirm_defect", "defect_type": "porosity", "expected": ""},
    )
    assert bad.status_code == 400 and "porosity" in bad.text


def test_the_registry_card_names_types_the_store_has_not_seen(typed_app, tmp_path: Path) -> None:
    app, store = typed_app
    _write_card(tmp_path / "registry", "v-typed", ["porosity", "cold_shut", "crack"])
    config = ReviewConfig(
        store=str(store.media_dir),
        password_time_cost=1,
        password_memory_kib=1024,
        registry=str(tmp_path / "registry"),
    )
    with_registry = create_app(config, store=store)
    client, token = login(with_registry)
    assert _choices(client.get("/parts/a2").text)[:4] == ["porosity", "cold_shut", "crack", "blowhole"]  # card order
    r = client.post(
        "/parts/a2/decision",
        data={"csrf_token": token, "action": "confirm_defect", "defect_type": "porosity", "expected": ""},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert {lab.defect_type for lab in q.reviewed_labels(store)} == {"porosity"}


def test_a_part_takes_the_types_of_its_worst_photos_model_when_qa_decides_it(typed_app, tmp_path: Path) -> None:
    """The page offers the part's model's card types (its worst photo's model); a decision posted from the part's
    first photo, shot under another model, must accept them too."""
    app, store = typed_app
    _write_card(tmp_path / "registry", "v-typed", ["porosity", "crack"])
    _photo(store, "k1", None, minutes=5, part_id="part-k", verdict=Verdict.review, model_version="v-plain")
    _photo(store, "k2", "crack", 0.7, minutes=6, part_id="part-k", verdict=Verdict.reject)
    config = ReviewConfig(
        store=str(store.media_dir), password_time_cost=1, password_memory_kib=1024, registry=str(tmp_path / "registry")
    )
    client, token = login(create_app(config, store=store))
    part = parts.part_of(store, "k1")
    assert part is not None and part.model_version == "v-typed"  # the reject photo's model
    assert "porosity" in _choices(client.get("/parts/k1").text)
    r = client.post(
        "/parts/k1/decision",
        data={"csrf_token": token, "action": "confirm_defect", "defect_type": "porosity", "seen": part.seen()},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    assert {lab.defect_type for lab in q.reviewed_labels(store)} == {"porosity"}


def _write_card(registry: Path, version: str, types: list[str]) -> None:
    from inspection.schemas import ModelCard

    card = ModelCard(
        version=version,
        created_at=NOW,
        backbone="test",
        mode="head",
        class_names=["ok", "defect"],
        preprocess={},
        thresholds=Thresholds(reject=0.6, review=0.3),
        target_escape_rate=0.005,
        data_fingerprint="x",
        n_train=10,
        defect_types=types,
    )
    (registry / "versions" / version).mkdir(parents=True)
    (registry / "versions" / version / "model_card.json").write_text(card.model_dump_json())


def _decided_store(store: DecisionStore) -> None:
    """Six flagged photos with the model's types; QA decides five of them."""
    for i, kind in enumerate(["crack", "crack", "blowhole", "crack", None, "blowhole"]):
        _photo(store, f"p{i}", kind, 0.7 if kind else None, minutes=i)
    parts.record_part_decision(store, "p0", "confirm_defect", "ann", defect_type="crack")  # agrees
    parts.record_part_decision(store, "p1", "confirm_defect", "ann", defect_type="blowhole")  # corrects
    parts.record_part_decision(store, "p2", "confirm_defect", "ann")  # no type named
    parts.record_part_decision(store, "p3", "override_ok", "ann")  # not a defect at all
    parts.record_part_decision(store, "p4", "confirm_defect", "ann", defect_type="crack")  # the model had no type
    # p5 waits: not in the table


def test_stats_confusion_of_confirmed_against_predicted_types(tmp_path: Path) -> None:
    store = DecisionStore(tmp_path / "store")
    try:
        _decided_store(store)
        s = compute_stats(store, NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    finally:
        store.close()
    assert s.type_confusion == {
        "crack": {"crack": 1, NO_PREDICTION: 1},
        "blowhole": {"crack": 1},
        UNSPECIFIED: {"blowhole": 1},
        OVERRIDDEN: {"crack": 1},
    }
    assert s.predicted_by_type == {"blowhole": 2, "crack": 3}
    assert s.defects_by_type["crack"] == 2 and s.defects_by_type["blowhole"] == 1
    assert s.type_compared == 2 and s.type_agreement == pytest.approx(0.5)
    rows, cols = s.confusion_axes()
    assert rows == ["blowhole", "crack", UNSPECIFIED, OVERRIDDEN] and cols == ["blowhole", "crack", NO_PREDICTION]
    summary = stats_summary(s)
    assert summary["type_agreement"] == pytest.approx(0.5) and summary["type_confusion"] == s.type_confusion


def test_stats_page_shows_the_confusion_table(typed_app) -> None:
    app, store = typed_app
    _decided_store(store)
    client, _ = login(app)
    html = client.get("/stats?since=2025-03-03T08:00&until=2025-03-03T10:00").text
    table = html[html.index('data-testid="type-confusion"') :]
    table = table[: table.index("</table>")]
    cells = dict(re.findall(r'data-cell="([^"]+)">(\d+)<', table))
    assert cells["crack|crack"] == "1" and cells["blowhole|crack"] == "1" and cells["ok|crack"] == "1"
    assert cells["unspecified|blowhole"] == "1" and cells["crack|none"] == "1" and cells["blowhole|blowhole"] == "0"
    assert 'class="num agree" data-cell="crack|crack"' in table  # the diagonal is marked
    assert "cold shut" not in table  # a1 (the model said cold_shut) waits: only decided photos count
    assert 'data-testid="type-agreement">50.0 %' in html
    charts = html[html.index("<h2>Model's types</h2>") :]
    assert "cold shut" in charts[: charts.index("</section>")]  # counts per predicted type, decided or not


def test_a_part_of_several_photos_takes_the_type_of_its_worst_typed_photo(tmp_path: Path) -> None:
    store = DecisionStore(tmp_path / "store")
    try:
        _photo(store, "m1", None, part_id="part-m", verdict=Verdict.reject)  # held by an untyped model
        _photo(store, "m2", "crack", 0.6, minutes=1, part_id="part-m", verdict=Verdict.review, score=0.85)
        _photo(store, "m3", "blowhole", 0.9, minutes=2, part_id="part-m", verdict=Verdict.review, score=0.5)
        part = parts.part_of(store, "m1")
        assert part is not None and len(part.photos) == 3 and part.worst.request_id == "m1"
        # the highest-scoring typed photo stands for the part, not the likelier type
        assert (part.predicted_type, part.predicted_type_probability) == ("crack", 0.6)
        _photo(store, "n1", "crack", 0.7, part_id="part-n", verdict=Verdict.reject)
        _photo(store, "n2", "blowhole", 0.9, minutes=1, part_id="part-n", verdict=Verdict.review)
        assert parts.part_of(store, "n1").predicted_type == "crack"  # the reject photo's type, not the likelier one
    finally:
        store.close()
