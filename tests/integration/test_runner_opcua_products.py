"""OPC UA with several products: each station object is fixed to one product (`station_products`) and judged by
that product's model; a typed model's flagged part fills `Result/DefectType` (real asyncua server and client)."""

from __future__ import annotations

import asyncio

import pytest
from asyncua import Client, ua
from fastapi.testclient import TestClient

from inspection.images import encode_png
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, OpcUaConfig
from inspection.runner.opcua import OUTPUTS
from tests.fixtures.serving import fake_inferencer, fake_typed_inferencer, free_port, sample_frame, tinted_frame

pytestmark = pytest.mark.timeout(180)

NS = "urn:inspection:runner"


def test_stations_fixed_to_products_and_the_defect_type_on_opcua(tmp_path):
    port = free_port()
    cfg = RunnerConfig(
        store=str(tmp_path / "store"),
        station="cell-1",
        auth=AuthConfig(required=False),
        product="impeller",
        products=("impeller", "tile"),
        station_products={"cell-2": "tile"},  # cell-1 gets the runner's product
        # lab mode: this test is about products, the secure handshake has its own tests (test_runner_opcua.py)
        opcua=OpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{port}", insecure=True, stations=("cell-1", "cell-2")),
    )
    rt = Runtime.build(cfg)
    rt.slots["impeller"].holder.swap(fake_inferencer("impeller-1"))
    rt.slots["tile"].holder.swap(fake_typed_inferencer("tile-typed-1"))
    crack = encode_png(tinted_frame(230, red=255, blue=180))

    async def main():
        c = Client(f"opc.tcp://127.0.0.1:{port}", timeout=30)
        await c.connect()
        try:
            idx = await c.get_namespace_index(NS)
            out = {}
            for station in ("cell-1", "cell-2"):
                obj = c.get_node(ua.NodeId(station, idx))
                values = await obj.call_method(ua.NodeId(f"{station}/InspectImage", idx), f"P-{station}", crack)
                out[station] = dict(zip([name for name, _, _ in OUTPUTS], values, strict=True))
                for var in ("Product", "ModelVersion", "Result/DefectType", "Result/DefectTypeProbability"):
                    out[station][var] = await c.get_node(ua.NodeId(f"{station}/{var}", idx)).read_value()
            obj = c.get_node(ua.NodeId("cell-2", idx))
            dark = encode_png(sample_frame(10))
            passed = await obj.call_method(ua.NodeId("cell-2/InspectImage", idx), "P-pass", dark)
            return out, dict(zip([name for name, _, _ in OUTPUTS], passed, strict=True))
        finally:
            await c.disconnect()

    with TestClient(create_app(cfg, rt)):
        out, passed = asyncio.run(main())
    one, two = out["cell-1"], out["cell-2"]
    assert (one["Product"], one["ModelVersion"]) == ("impeller", "impeller-1")
    assert (two["Product"], two["ModelVersion"]) == ("tile", "tile-typed-1")
    assert one["Verdict"] == two["Verdict"] == "reject"
    assert one["DefectType"] == one["Result/DefectType"] == "" and one["Result/DefectTypeProbability"] == -1.0
    assert two["DefectType"] == two["Result/DefectType"] == "crack"
    assert 0.5 < two["Result/DefectTypeProbability"] <= 1.0
    stored = rt.store.get_inspection(two["RequestId"])
    assert stored.product == "tile" and stored.defect_type == "crack" and stored.station == "cell-2"
    assert rt.store.get_inspection(one["RequestId"]).product == "impeller"
    assert passed["Verdict"] == "pass" and passed["DefectType"] == ""
