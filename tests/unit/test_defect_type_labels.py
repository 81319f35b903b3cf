"""Defect types on the data side (issue #16 item 5): folders named through the label map give typed samples and
a typed model; QA's confirmed types flow back as labels into the manifest and the next run."""

from __future__ import annotations

import csv
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspection.decisions import DecisionStore
from inspection.errors import ConfigError, DataError
from inspection.ingest import IngestConfig, apply_review_labels, load_samples, read_records, run_ingest
from inspection.review import parts
from inspection.review import queries as q
from inspection.schemas import InspectionResult, Thresholds, Verdict
from tests.unit.test_crossfit import head_config, tiny_weights  # noqa: F401 - fixture

TYPED_MAP = {"crack": "defect:crack", "blowhole": "defect:blowhole", "ok": "ok"}
FOLDER_OF_PART = ["crack"] * 4 + ["blowhole"] * 4 + ["ok"] * 8  # 16 castings, 3 photos each
NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def typed_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic castings filed under crack/, blowhole/ and ok/, each part photographed 3 times (turned, mirrored)."""
    from inspection.synth import render_part

    root = tmp_path_factory.mktemp("typed_drop")
    for i, folder in enumerate(FOLDER_OF_PART):
        img, _ = render_part(np.random.default_rng([23, i]), folder != "ok")
        grey = img[:, :, 0]
        (root / folder).mkdir(exist_ok=True)
        for j, shot in enumerate((grey, np.rot90(grey, 1), cv2.flip(grey, 1))):
            cv2.imwrite(str(root / folder / f"p{i:02d}_{j}.png"), np.ascontiguousarray(shot))
    return root


@pytest.fixture(scope="module")
def typed_store(typed_folders: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("typed_store")
    result = run_ingest(IngestConfig(label_map=TYPED_MAP, progress=False), [typed_folders], store)
    assert result.groups == len(FOLDER_OF_PART), "the turned and mirrored shots of a part must group together"
    return store


@pytest.fixture(scope="module")
def typed_run(typed_store: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    from inspection.train import run_train

    return run_train(head_config(tiny_weights), typed_store, tmp_path_factory.mktemp("typed_run") / "run")


# ------------------------------------------------------------------------------------------------ ingest
def test_typed_folders_give_typed_samples_and_the_summary_counts_them(typed_folders: Path, tmp_path: Path) -> None:
    result = run_ingest(IngestConfig(label_map=TYPED_MAP, progress=False), [typed_folders], tmp_path / "store")
    assert result.defect_types == {"blowhole": 12, "crack": 12}
    samples = load_samples(tmp_path / "store")
    by_folder = {Path(r.source_path).parent.name: set() for r in read_records(tmp_path / "store")}
    records = {r.sha256: r for r in read_records(tmp_path / "store", "accepted")}
    for s in samples:
        folder = Path(records[s.sha256].source_path).parent.name
        by_folder[folder].add((s.label, s.defect_type))
        assert records[s.sha256].defect_type == s.defect_type
    assert by_folder == {"crack": {("defect", "crack")}, "blowhole": {("defect", "blowhole")}, "ok": {("ok", None)}}
    # a re-run adds nothing and keeps the types; an untyped label map still gives plain labels
    again = run_ingest(IngestConfig(label_map=TYPED_MAP, progress=False), [typed_folders], tmp_path / "store")
    assert again.accepted == 0 and again.defect_types == result.defect_types
    plain = {"crack": "defect", "blowhole": "defect", "ok": "ok"}
    untyped = run_ingest(IngestConfig(label_map=plain, progress=False), [typed_folders], tmp_path / "plain")
    assert untyped.defect_types == {} and {s.defect_type for s in load_samples(tmp_path / "plain")} == {None}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("defect:Crack", "not a valid name"),
        ("defect:", "not a valid name"),
        ("defect:cold shut", "not a valid name"),
        ("defect:" + "x" * 33, "not a valid name"),
        ("defect:ok", "reserved"),
        ("scrap", "allowed: ok, defect, or defect:<type>"),
    ],
)
def test_label_map_refuses_bad_values_saying_what_is_allowed(value: str, message: str) -> None:
    from inspection.config import from_dict

    with pytest.raises(ConfigError, match=message) as info:
        from_dict(IngestConfig, {"label_map": {"good": "defect:cold_shut", "bad": value}})
    assert "bad:" in str(info.value) and "good" not in str(info.value)  # names the folder at fault only


def test_an_older_manifest_gets_the_type_columns_on_open(typed_folders: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run_ingest(IngestConfig(label_map=TYPED_MAP, progress=False), [typed_folders / "crack"], store)
    with sqlite3.connect(store / "manifest.sqlite") as con:  # as written before types existed
        con.execute("ALTER TABLE records DROP COLUMN defect_type")
        con.execute("ALTER TABLE review_labels DROP COLUMN defect_type")
    samples = load_samples(store)  # opening adds the columns back (NULL: untyped)
    assert samples and {s.defect_type for s in samples} == {None}
    with sqlite3.connect(store / "manifest.sqlite") as con:
        assert "defect_type" in {row[1] for row in con.execute("PRAGMA table_info(review_labels)")}
    apply_review_labels(store, [(samples[0].sha256, "defect", "qa1", NOW, "blowhole")])
    assert load_samples(store)[0].defect_type == "blowhole"


def test_review_label_types_win_over_folder_types(typed_store: Path, tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "store"
    shutil.copytree(typed_store, store)
    samples = load_samples(store)
    crack = [s for s in samples if s.defect_type == "crack"]
    blowhole = next(s for s in samples if s.defect_type == "blowhole")
    ok = next(s for s in samples if s.label == "ok")
    changed = apply_review_labels(
        store,
        [
            (crack[0].sha256, "defect", "qa1", NOW, "blowhole"),  # QA corrects the type
            (crack[1].sha256, "defect", "qa1", NOW),  # QA named no type: the review decides, untyped
            (crack[2].sha256, "ok", "qa1", NOW),  # not a defect: no type
            (blowhole.sha256, "defect", "qa2", NOW + timedelta(hours=1), "crack"),  # the latest review wins
            (blowhole.sha256, "defect", "qa1", NOW, "shrinkage"),
            (ok.sha256, "defect", "qa1", NOW, "shrinkage"),  # QA's enum names a type no folder had
        ],
    )
    assert changed == 5
    now = {s.sha256: (s.label, s.defect_type) for s in load_samples(store)}
    assert now[crack[0].sha256] == ("defect", "blowhole")
    assert now[crack[1].sha256] == ("defect", None)
    assert now[crack[2].sha256] == ("ok", None)
    assert now[blowhole.sha256] == ("defect", "crack")
    assert now[ok.sha256] == ("defect", "shrinkage")
    # applied one by one or all at once, the same reviews give the same types
    apply_review_labels(store, [(crack[1].sha256, "defect", "qa3", NOW + timedelta(hours=2), "blowhole")])
    apply_review_labels(store, [(crack[1].sha256, "ok", "qa3", NOW + timedelta(hours=3))])
    assert next(s for s in load_samples(store) if s.sha256 == crack[1].sha256).defect_type is None
    assert apply_review_labels(store, [(crack[0].sha256, "defect", "qa1", NOW, "blowhole")]) == 0  # idempotent
    for bad, message in (
        ((ok.sha256, "ok", "qa1", NOW, "crack"), "only defect can"),
        ((ok.sha256, "defect", "qa1", NOW, "Crack!"), "not a valid name"),
        ((ok.sha256, "defect", "qa1", NOW, "crack", "extra"), "expected"),
    ):
        with pytest.raises(DataError, match=message):
            apply_review_labels(store, [bad])


# ------------------------------------------------------------------------------------------------ model
def test_a_run_on_typed_folders_learns_the_types(typed_run) -> None:
    card = typed_run.card
    assert card.defect_types == ["blowhole", "crack"]
    assert card.type_metrics["photos_per_type"] == {"blowhole": 12, "crack": 12}
    confusion = np.asarray(card.type_metrics["oof_confusion"])  # the 24 typed photos, each scored out of fold once
    assert confusion.sum() == 24
    assert card.type_metrics["oof_accuracy"]["photo"]["value"] == pytest.approx(np.trace(confusion) / 24)


# ------------------------------------------------------------------------------------------------ QA -> labels
def _line_photo(store: DecisionStore, rid: str, part_id: str, data: bytes, ts: datetime, kind: str) -> None:
    """A flagged line photo as the runner records it with a typed model's answer."""
    result = InspectionResult(
        request_id=rid,
        part_id=part_id,
        station="line-1",
        timestamp=ts,
        verdict=Verdict.reject,
        defect_score=0.93,
        thresholds=Thresholds(reject=0.5, review=0.2),
        model_version="v-typed",
        latency_ms=4.0,
        defect_type=kind,
        defect_type_probability=0.71,
    )
    store.record_inspection(result, data, np.zeros((4, 4), np.float32), "http")


def test_a_typed_review_decision_becomes_a_typed_label_and_reaches_the_next_run(
    typed_store: Path,
    typed_run,
    tiny_weights: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    import shutil

    from inspection.review import ReviewConfig, run_review_export
    from inspection.train import run_train

    store = tmp_path / "store"
    shutil.copytree(typed_store, store)
    samples = load_samples(store)
    part = [s for s in samples if s.defect_type == "blowhole"][:3]  # one blowhole part's three photos ...
    assert len({s.group_id for s in part}) == 1
    decisions = DecisionStore(tmp_path / "decisions")
    try:
        for i, s in enumerate(part):  # ... flagged on the line, the model calling it a blowhole
            _line_photo(decisions, f"r{i}", "part-7", s.path.read_bytes(), NOW + timedelta(seconds=i), "blowhole")
        parts.record_part_decision(decisions, "r0", "confirm_defect", "ann", defect_type="crack")  # QA: a crack
        labels = q.reviewed_labels(decisions)
        assert {(r.sha256, r.label, r.defect_type) for r in labels} == {(s.sha256, "defect", "crack") for s in part}
        export = run_review_export(ReviewConfig(store=str(decisions.media_dir)), tmp_path / "export")
        with open(tmp_path / "export" / "review_labels.csv") as fh:
            assert {r["defect_type"] for r in csv.DictReader(fh)} == {"crack"} and export.n_defect == 3
        assert apply_review_labels(store, [r.for_manifest() for r in labels]) == 3
    finally:
        decisions.close()
    after = {s.sha256: s.defect_type for s in load_samples(store)}
    assert {after[s.sha256] for s in part} == {"crack"}
    rerun = run_train(head_config(tiny_weights), store, tmp_path / "run2")
    assert typed_run.card.type_metrics["photos_per_type"] == {"blowhole": 12, "crack": 12}
    assert rerun.card.type_metrics["photos_per_type"] == {"blowhole": 9, "crack": 15}  # QA's types were learned


def test_override_ok_carries_no_type_and_unknown_types_are_refused(tmp_path: Path) -> None:
    decisions = DecisionStore(tmp_path / "decisions")
    try:
        png = cv2.imencode(".png", np.full((40, 40, 3), 90, np.uint8))[1].tobytes()
        png2 = cv2.imencode(".png", np.full((40, 40, 3), 160, np.uint8))[1].tobytes()
        _line_photo(decisions, "a", "part-a", png, NOW, "cold_shut")
        _line_photo(decisions, "b", "part-b", png2, NOW, "cold_shut")
        parts.record_part_decision(decisions, "a", "override_ok", "ann", defect_type="crack")  # picked, then OK
        # the store's typed model answers a plant's own name: QA may confirm it; a name nobody uses is refused
        parts.record_part_decision(decisions, "b", "confirm_defect", "ann", defect_type="cold_shut")
        with pytest.raises(q.ReviewError, match="defect type 'porosity' is not allowed"):
            parts.record_part_decision(decisions, "b", "confirm_defect", "ann", defect_type="porosity")
        parts.record_part_decision(
            decisions, "b", "confirm_defect", "ann", defect_type="porosity", extra_types=["porosity"]
        )
        with decisions.engine.connect() as conn:
            assert "cold_shut" in q.known_types(conn)
        by_label = {r.label: r.defect_type for r in q.reviewed_labels(decisions)}
        assert by_label == {"ok": None, "defect": "porosity"}
    finally:
        decisions.close()


def test_settling_a_part_labelled_both_ways_keeps_its_type(typed_folders: Path, tmp_path: Path) -> None:
    """The conflicts queue decides a part's label; settled as a defect, the part keeps its folder's type."""
    import shutil

    from inspection.ingest import label_conflicts, relabel_group

    drop = tmp_path / "drop"
    shutil.copytree(typed_folders / "crack", drop / "crack")
    (drop / "ok").mkdir()
    moved = sorted((drop / "crack").glob("p00_*.png"))[0]
    shutil.move(moved, drop / "ok" / moved.name)  # one photo of crack part 0 filed as good
    store = tmp_path / "store"
    run_ingest(IngestConfig(label_map=TYPED_MAP, progress=False), [drop], store)
    (conflict,) = label_conflicts(store)
    assert relabel_group(store, conflict.group_id, "defect", "qa1", NOW) == 3
    settled = [s for s in load_samples(store) if s.group_id == conflict.group_id]
    assert {(s.label, s.defect_type) for s in settled} == {("defect", "crack")}
    relabel_group(store, conflict.group_id, "ok", "qa1", NOW + timedelta(minutes=1))
    assert {(s.label, s.defect_type) for s in load_samples(store) if s.group_id == conflict.group_id} == {("ok", None)}
