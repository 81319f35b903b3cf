"""Defect types on the runner side (issue 16, item 5), with a contract-shaped typed fake model: a flagged part gets
its most likely type and that type's probability in the answer, the decision store and OPC UA; a passed or held
part, and a model without types, get None. Also: old decision stores get the new columns when opened."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Column, MetaData, Table, create_engine, insert
from sqlalchemy import inspect as sa_inspect

from inspection.decisions import DecisionStore, add_missing_columns, inspections
from inspection.images import decode_image, encode_png
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig
from inspection.runner.inferencer import ModelRejectedError, smoke_reference
from inspection.schemas import InspectionResult, Thresholds, Verdict
from tests.fixtures.serving import FakeTypedModel, fake_inferencer, fake_typed_inferencer, sample_frame, tinted_frame

TOKEN = "types-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}


def _client(tmp_path: Path, inferencer) -> tuple[TestClient, Runtime]:
    cfg = RunnerConfig(store=str(tmp_path / "store"), station="st-t", auth=AuthConfig(token=TOKEN))
    rt = Runtime.build(cfg)
    rt.holder.swap(inferencer)
    return TestClient(create_app(cfg, rt)), rt


def _post(c: TestClient, body: bytes, part: str):
    return c.post("/v1/inspect", content=body, headers=AUTH, params={"part_id": part})


def _expected_crack(body: bytes) -> float:
    means = decode_image(body).reshape(-1, 3).mean(axis=0)
    return float(means[0] / (means[0] + means[2]))


def test_a_flagged_part_gets_its_most_likely_type(tmp_path):
    crack = encode_png(tinted_frame(230, red=255, blue=180))  # reject, reddish
    blowhole = encode_png(tinted_frame(150, red=90, blue=240))  # review, bluish
    passed = encode_png(tinted_frame(20, red=40, blue=5))  # pass: no defect to name
    c, rt = _client(tmp_path, fake_typed_inferencer())
    with c:
        answers = {name: _post(c, body, name) for name, body in (("c", crack), ("b", blowhole), ("p", passed))}
        bad = _post(c, b"not an image", "x")
        again = c.get(f"/v1/results/{answers['c'].json()['request_id']}", headers=AUTH)
    r = {k: v.json() for k, v in answers.items()}
    assert (r["c"]["verdict"], r["c"]["defect_type"]) == ("reject", "crack")
    assert r["c"]["defect_type_probability"] == pytest.approx(_expected_crack(crack), abs=1e-5)
    assert (r["b"]["verdict"], r["b"]["defect_type"]) == ("review", "blowhole")
    assert r["b"]["defect_type_probability"] == pytest.approx(1 - _expected_crack(blowhole), abs=1e-5)
    assert r["p"]["verdict"] == "pass" and r["p"]["defect_type"] is None and r["p"]["defect_type_probability"] is None
    assert bad.json()["result"]["defect_type"] is None  # held without a model verdict
    row = rt.store.get_row(r["c"]["request_id"])
    assert row["defect_type"] == "crack" and row["defect_type_probability"] == pytest.approx(
        r["c"]["defect_type_probability"]
    )
    assert rt.store.get_row(r["p"]["request_id"])["defect_type"] is None
    assert again.json() == r["c"]  # read back from the store: the same answer


def test_a_model_without_types_answers_none(tmp_path):
    c, rt = _client(tmp_path, fake_inferencer())
    with c:
        r = _post(c, encode_png(sample_frame(250)), "u").json()
    assert r["verdict"] == "reject" and r["defect_type"] is None and r["defect_type_probability"] is None
    assert rt.store.get_row(r["request_id"])["defect_type"] is None


def test_type_output_out_of_contract_holds_the_part(tmp_path):
    class Broken(FakeTypedModel):
        def predict_with_types(self, batch, busy=False):
            probs, heat, types = super().predict_with_types(batch, busy)
            return probs, heat, types[:, :1]  # one column for two types

    inf = fake_typed_inferencer()
    inf.model = Broken()
    with pytest.raises(ModelRejectedError, match="defect-type probabilities"):
        inf.smoke_test()
    c, rt = _client(tmp_path, inf)
    with c:
        r = _post(c, encode_png(sample_frame(250)), "z")
    assert r.status_code == 503 and r.json()["reason"] == "model_error"
    assert rt.store.get_inspection(r.json()["result"]["request_id"]).verdict == "review"


def test_the_smoke_reference_covers_the_types():
    inf = fake_typed_inferencer()
    ref = smoke_reference(inf.model, inf.input_size)
    assert len(ref["type_probs"]) == len(ref["scores"]) == 2 and len(ref["type_probs"][0]) == 2
    assert inf.check_reference(ref) < 1e-6
    # a type head off by 0.01 (scores and heatmaps as exported): refused by the types alone
    damaged = {**ref, "type_probs": [[p[0] + 0.01, p[1] - 0.01] for p in ref["type_probs"]]}
    with pytest.raises(ModelRejectedError, match="reference"):
        inf.check_reference(damaged)
    assert "type_probs" not in smoke_reference(fake_inferencer().model, 64)  # untyped: as before


def test_opcua_result_variables_carry_the_type():
    from inspection.runner.opcua.server import NO_SCORE, result_values

    base = {
        "request_id": "r",
        "part_id": "p",
        "station": "s",
        "timestamp": datetime.now(UTC),
        "latency_ms": 1.0,
        "thresholds": Thresholds(reject=0.8, review=0.5),
    }
    typed = InspectionResult(
        **base, verdict=Verdict.reject, defect_score=0.9, defect_type="crack", defect_type_probability=0.7
    )
    plain = InspectionResult(**base, verdict=Verdict.reject, defect_score=0.9)
    assert (result_values(typed, 1)["DefectType"], result_values(typed, 1)["DefectTypeProbability"]) == ("crack", 0.7)
    assert (result_values(plain, 2)["DefectType"], result_values(plain, 2)["DefectTypeProbability"]) == ("", NO_SCORE)


# -- the decision store ---------------------------------------------------------------------------------------


ADDED_COLUMNS = ("product", "defect_type", "defect_type_probability")  # to `inspections` after the first release


def _old_inspections_table(path: Path) -> None:
    """The `inspections` table as the first release created it (decisions.py's without the columns added since),
    with one row."""
    old = MetaData()
    first = [c for c in inspections.columns if c.name not in ADDED_COLUMNS]
    columns = [Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable, index=c.index) for c in first]
    table = Table("inspections", old, *columns)
    engine = create_engine(f"sqlite:///{path}")
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(table),
            {
                "request_id": "old-1",
                "part_id": "P",
                "station": "s",
                "timestamp": datetime(2024, 1, 1, tzinfo=UTC),
                "verdict": "reject",
                "defect_score": 0.9,
                "reject_threshold": 0.8,
                "review_threshold": 0.5,
                "model_version": "v1",
                "latency_ms": 3.0,
                "source": "http",
            },
        )
    engine.dispose()


def test_an_old_store_gets_the_new_columns_when_opened(tmp_path):
    db = tmp_path / "decisions.sqlite"
    _old_inspections_table(db)
    store = DecisionStore(db)
    columns = {c["name"] for c in sa_inspect(store.engine).get_columns("inspections")}
    assert set(ADDED_COLUMNS) <= columns
    assert "ix_inspections_product" in {i["name"] for i in sa_inspect(store.engine).get_indexes("inspections")}
    old = store.get_inspection("old-1")
    assert old.verdict == "reject" and old.product is None and old.defect_type is None
    new = old.model_copy(
        update={"request_id": "new-1", "product": "tile", "defect_type": "crack", "defect_type_probability": 0.8}
    )
    store.record_inspection(new, None, None, "http")
    store.close()
    again = DecisionStore(db)  # opening it again adds nothing and keeps what was stored
    assert add_missing_columns(again.engine) == []
    got = again.get_inspection("new-1")
    assert (got.product, got.defect_type, got.defect_type_probability) == ("tile", "crack", 0.8)
    again.close()
