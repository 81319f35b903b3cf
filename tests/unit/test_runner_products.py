"""One runner, several products (issue 16, item 6), with contract-shaped fake models: a request picks its product
(query, form field, X-Product, or its station's fixed product), each product has its own model, hot swap and drift
monitor, and a product nobody serves is held fail-closed with a stored `review`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from inspection.errors import ConfigError
from inspection.images import encode_png
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, FolderConfig
from inspection.runner.hotswap import HotSwapper
from inspection.schemas import InspectionResult
from tests.fixtures.serving import fake_inferencer, sample_frame

TOKEN = "products-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REJECT = encode_png(sample_frame(250))
PASS = encode_png(sample_frame(10))


def _config(tmp_path: Path, **kw) -> RunnerConfig:
    base = RunnerConfig(
        store=str(tmp_path / "store"),
        station="st-1",
        auth=AuthConfig(token=TOKEN),
        product="impeller",
        products=("impeller", "tile"),
    )
    return replace(base, **kw)


def _runtime(tmp_path: Path, **kw) -> tuple[RunnerConfig, Runtime]:
    cfg = _config(tmp_path, **kw)
    rt = Runtime.build(cfg)
    for product, slot in rt.slots.items():
        slot.holder.swap(fake_inferencer(f"{product}-1"))
    return cfg, rt


def _post(c: TestClient, body: bytes = REJECT, part: str = "P-1", headers: dict | None = None, **params):
    h = {**AUTH, "Content-Type": "image/png", **(headers or {})}
    return c.post("/v1/inspect", content=body, headers=h, params={"part_id": part, **params})


# -- configuration -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"product": "pump", "products": ("impeller", "tile")}, "not in products"),
        ({"station_products": {"cell-3": "pump"}}, "not in the products served"),
        ({"products": ("impeller", "impeller")}, "twice"),
        ({"products": ("bad name",)}, "allowed are"),
        ({"product": None, "products": ()}, "no product to serve"),
        ({"station_products": {"a/b": "tile"}}, "station"),
    ],
)
def test_product_config_is_checked(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides).validate()


def test_a_runner_serves_one_product_default_unless_told(tmp_path):
    cfg = RunnerConfig(store=str(tmp_path / "s"))
    assert cfg.served_products == ("default",) and cfg.product_for_station("any") == "default"
    cfg = _config(tmp_path, station_products={"cell-9": "tile"})
    assert cfg.served_products == ("impeller", "tile")
    assert cfg.product_for_station("cell-9") == "tile" and cfg.product_for_station("st-1") == "impeller"


def test_cli_builds_the_product_config(tmp_path):
    import argparse

    from inspection.runner.cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["serve", "--registry", str(tmp_path), "--products", "impeller,tile", "--product", "impeller"]
        + ["--station-product", "cell-3=tile", "--station-product", "cell-4=impeller"]
    )
    cfg = build_config(args)
    assert cfg.served_products == ("impeller", "tile") and cfg.product == "impeller"
    assert cfg.station_products == {"cell-3": "tile", "cell-4": "impeller"}
    bad = parser.parse_args(["serve", "--registry", str(tmp_path), "--station-product", "cell-3=pump"])
    with pytest.raises(ConfigError, match="pump"):
        build_config(bad)


# -- which product judges a part --------------------------------------------------------------------------------


def test_the_request_picks_the_product_and_its_model_judges_it(tmp_path):
    cfg, rt = _runtime(tmp_path)
    with TestClient(create_app(cfg, rt)) as c:
        by_query = _post(c, part="Q", product="tile")
        by_header = _post(c, part="H", headers={"X-Product": "tile"})
        by_form = c.post(
            "/v1/inspect",
            files={"file": ("p.png", REJECT, "image/png")},
            data={"part_id": "F", "product": "tile"},
            headers=AUTH,
        )
        default = _post(c, part="D")
    for r in (by_query, by_header, by_form):
        assert r.status_code == 200, r.text
        assert r.json()["product"] == "tile" and r.json()["model_version"] == "tile-1"
    assert default.json()["product"] == "impeller" and default.json()["model_version"] == "impeller-1"
    row = rt.store.get_row(by_query.json()["request_id"])
    assert row["product"] == "tile" and rt.store.get_inspection(row["request_id"]).product == "tile"
    metrics = rt.metrics.render().decode()
    assert 'inspection_runner_product_verdicts_total{product="tile",verdict="reject"} 3.0' in metrics
    assert 'inspection_runner_product_verdicts_total{product="impeller",verdict="reject"} 1.0' in metrics


def test_a_station_fixed_to_a_product_uses_its_model_and_refuses_another(tmp_path):
    cfg, rt = _runtime(tmp_path, station_products={"cell-3": "tile"})
    with TestClient(create_app(cfg, rt)) as c:
        fixed = _post(c, part="S", station="cell-3")
        same = _post(c, part="S2", station="cell-3", product="tile")
        other = _post(c, part="S3", station="cell-3", product="impeller")
    assert fixed.json()["product"] == "tile" and fixed.json()["model_version"] == "tile-1"
    assert same.status_code == 200 and same.json()["product"] == "tile"
    assert other.status_code == 400 and other.json()["reason"] == "product_mismatch"
    held = rt.store.get_inspection(other.json()["result"]["request_id"])
    assert held.verdict == "review" and held.defect_score is None and "cell-3" in held.reason


@pytest.mark.parametrize(
    ("params", "reason", "stored_product"),
    [
        ({"product": "pump"}, "unknown_product", "pump"),  # a plausible name, not served here: recorded as named
        ({"product": "no/such"}, "bad_field", None),  # not a product name at all
    ],
)
def test_an_unknown_product_is_held_fail_closed(tmp_path, params, reason, stored_product):
    cfg, rt = _runtime(tmp_path)
    with TestClient(create_app(cfg, rt)) as c:
        r = _post(c, body=PASS, part="U", **params)  # a clear pass for any model: still no verdict
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["reason"] == reason and body["result"]["verdict"] == "review"
    if reason == "unknown_product":
        assert "impeller, tile" in body["detail"]  # says what is served
    stored = rt.store.get_inspection(body["result"]["request_id"])
    assert stored.verdict == "review" and stored.defect_score is None and stored.product == stored_product
    assert rt.store.get_row(stored.request_id)["image_path"] is not None  # QA sees what came
    assert "unknown_product" not in rt.metrics.render().decode().split("product_verdicts")[-1]


def test_without_a_default_product_a_request_must_name_one(tmp_path):
    cfg, rt = _runtime(tmp_path, product=None)
    with TestClient(create_app(cfg, rt)) as c:
        r = _post(c, part="N")
        named = _post(c, part="N2", product="impeller")
    assert r.status_code == 400 and r.json()["reason"] == "missing_product"
    assert named.status_code == 200 and named.json()["product"] == "impeller"


# -- one product's trouble is its own -----------------------------------------------------------------------------


def _alias(home: Path, version: str, tick: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / "aliases.tmp"
    tmp.write_text(json.dumps({"production": version, "previous": None}))
    os.replace(tmp, home / "aliases.json")
    t = time.time() + tick
    os.utime(home / "aliases.json", (t, t))


def test_a_refused_version_of_one_product_leaves_the_other_serving(tmp_path):
    root = tmp_path / "reg"
    cfg, rt = _runtime(tmp_path)

    def loader(version: str):
        if version.startswith("bad"):
            raise ValueError("protobuf parsing failed")
        return fake_inferencer(version)

    for product, slot in rt.slots.items():
        slot.swapper = HotSwapper(root, slot.holder, metrics=rt.metrics, loader=loader, product=product)
    _alias(root / "products" / "impeller", "impeller-1", 1)
    _alias(root / "products" / "tile", "tile-1", 1)
    with TestClient(create_app(cfg, rt)) as c:
        assert all(s.swapper.check() == "unchanged" for s in rt.slots.values())
        _alias(root / "products" / "tile", "tile-2", 2)
        _alias(root / "products" / "impeller", "bad-3", 3)
        r = c.post("/v1/admin/reload", headers=AUTH, params={"product": "tile"})
        assert r.json()["outcome"] == "swapped" and r.json()["version"] == "tile-2"
        assert rt.slots["impeller"].holder.current.version == "impeller-1"  # not looked at yet
        r = c.post("/v1/admin/reload", headers=AUTH)  # every product
        assert r.json()["products"]["impeller"]["outcome"] == "refused"
        assert r.json()["products"]["tile"]["outcome"] == "unchanged"
        a, b = _post(c, part="A"), _post(c, part="B", product="tile")
        assert a.status_code == b.status_code == 200
        assert (a.json()["model_version"], b.json()["model_version"]) == ("impeller-1", "tile-2")
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["degraded"] is True
        assert ready["degraded_reasons"][0].startswith("product impeller: ") and "bad-3" in ready["degraded_reasons"][0]
        assert ready["products"]["tile"]["degraded_reasons"] == []
        assert c.post("/v1/admin/reload", headers=AUTH, params={"product": "pump"}).status_code == 404
    metrics = rt.metrics.render().decode()
    assert 'inspection_runner_product_swaps_total{outcome="swapped",product="tile"} 1.0' in metrics
    assert 'inspection_runner_product_swaps_total{outcome="refused",product="impeller"} 1.0' in metrics


def test_readyz_per_product_and_a_product_without_a_model(tmp_path):
    cfg = _config(tmp_path)
    rt = Runtime.build(cfg)
    rt.slots["impeller"].holder.swap(fake_inferencer("impeller-1"))  # tile has no model yet
    with TestClient(create_app(cfg, rt)) as c:
        everything = c.get("/readyz")
        impeller = c.get("/readyz", params={"product": "impeller"})
        tile = c.get("/readyz", params={"product": "tile"})
        assert c.get("/readyz", params={"product": "pump"}).status_code == 404
        held = _post(c, part="T", product="tile")
        served = _post(c, part="I")
    assert everything.status_code == 503 and everything.json()["products"]["impeller"]["ready"] is True
    assert impeller.status_code == 200 and impeller.json()["model_version"] == "impeller-1"
    assert tile.status_code == 503 and tile.json()["product"] == "tile"
    assert held.status_code == 503 and held.json()["reason"] == "no_model"  # known product, no model: held
    assert rt.store.get_inspection(held.json()["result"]["request_id"]).product == "tile"
    assert served.status_code == 200 and served.json()["model_version"] == "impeller-1"


def test_each_product_has_its_own_drift_monitor(tmp_path):
    cfg, rt = _runtime(tmp_path)
    with TestClient(create_app(cfg, rt)) as c:
        for i in range(3):
            _post(c, part=f"a{i}")
        _post(c, part="b", product="tile")
        text = c.get("/metrics", headers=AUTH).text
    a, b = rt.slots["impeller"].drift, rt.slots["tile"].drift
    assert a is not None and b is not None and a is not b
    assert (a.observed, b.observed) == (3, 1)
    assert 'inspection_drift_window_parts{product="impeller"}' in text
    assert 'inspection_drift_psi{product="tile",quantity=' in text
    assert text.count("# TYPE inspection_drift_index gauge") == 1


def test_folder_mode_judges_the_station_s_product(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg, rt = _runtime(tmp_path, station_products={"st-1": "tile"}, folder=FolderConfig(watch=drop, settle_s=0))
    for slot in rt.slots.values():
        slot.batcher.start()
    try:
        (drop / "a.png").write_bytes(REJECT)
        os.utime(drop / "a.png", (time.time() - 5, time.time() - 5))
        assert rt.folder.scan_once() == 1
    finally:
        rt.stop()
    line = InspectionResult.model_validate_json((drop / "results.jsonl").read_text().splitlines()[0])
    assert line.product == "tile" and line.model_version == "tile-1"


def test_folder_mode_and_opcua_need_a_product_for_their_stations(tmp_path):
    with pytest.raises(ConfigError, match="folder mode"):
        Runtime.build(_config(tmp_path, product=None, folder=FolderConfig(watch=tmp_path / "drop")))
