"""Defect types end to end (issue 16, item 5): a real ONNX model that answers defect types, served by the runner over
real HTTP, answers the most likely type of each flagged part and its probability, stores both, and publishes them
on MQTT; an untyped model served by the same runner (another product) answers None.

The typed model is built, not trained, like `known_net` (tests/fixtures/model.py): `known_net` plus a type head
solved by least squares on the pooled features of the defect parts, so that each defect part's type is the one
this test assigned to it (logit difference +/-3: probability 0.953 for its own type).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from inspection.registry import Registry
from inspection.runner import Runtime, create_app
from inspection.runner.config import MqttConfig, SwapConfig
from inspection.schemas import InspectionResult
from tests.fixtures.model import KNOWN_LOGIT, Part, known_card
from tests.fixtures.serving import serve_in_thread, version_copy

pytestmark = pytest.mark.timeout(300)

TYPES = ("crack", "blowhole")
TOKEN = "typed-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}


def assigned_type(index: int) -> str:
    """The type this test gives the `index`-th defect part: alternating, so neighbours in name order differ."""
    return TYPES[index % 2]


@pytest.fixture(scope="module")
def typed_export(known_net, known_parts: list[Part], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`known_net` with a type head (crack / blowhole, as `assigned_type`), exported as version `typed-1`."""
    import torch

    from inspection.export import ExportConfig, export_net
    from inspection.images import read_image

    net = copy.deepcopy(known_net).eval()
    defects = [p for p in known_parts if p.label == "defect"]
    images = torch.from_numpy(np.stack([read_image(p.path) for p in defects]))
    with torch.no_grad():
        features = net.pooled_features(images).double().numpy()  # (N, D): what the type head reads
    target = np.array([KNOWN_LOGIT if assigned_type(i) == "crack" else -KNOWN_LOGIT for i in range(len(defects))])
    mean = features.mean(axis=0)
    w, *_ = np.linalg.lstsq(features - mean, target - target.mean(), rcond=None)  # crack logit - blowhole logit
    b = target.mean() - mean @ w
    net.type_names = TYPES
    net.type_head = torch.nn.Linear(sum(net.widths), len(TYPES))
    with torch.no_grad():  # half the difference on each row: softmax([d/2, -d/2])[0] = sigmoid(d)
        net.type_head.weight.copy_(torch.from_numpy(np.stack([w / 2, -w / 2])).float())
        net.type_head.bias.copy_(torch.tensor([b / 2, -b / 2], dtype=torch.float32))
        _, _, types = net(images)
    got = [TYPES[int(i)] for i in types.argmax(dim=1)]
    assert got == [assigned_type(i) for i in range(len(defects))], "the hand-set type head does not follow the labels"
    card = known_card(net, known_parts, version="typed-1").model_copy(update={"defect_types": list(TYPES)})
    out = tmp_path_factory.mktemp("typed_export") / "export"
    export_net(ExportConfig(measure_latency=False), net, card, out, val=known_parts[::4])
    return out


def test_a_typed_model_answers_stores_and_publishes_the_defect_type(
    typed_export: Path,
    known_export: Path,
    known_parts: list[Part],
    mosquitto_broker,
    mqtt_subscriber,
    registry_runner_config,
    tmp_path: Path,
) -> None:
    from inspection.runner.inferencer import REFERENCE_FILE

    reference = json.loads((typed_export / REFERENCE_FILE).read_text())["model.onnx"]
    assert len(reference["type_probs"]) == len(reference["scores"])  # export records the types on the smoke frames
    root = tmp_path / "registry"
    tile, impeller = Registry(root, product="tile"), Registry(root, product="impeller")
    tile.register(typed_export)
    impeller.register(version_copy(known_export, tmp_path / "plain-1", "plain-1"))
    tile.promote("typed-1", reason="typed model", force=True)
    impeller.promote("plain-1", reason="untyped model", force=True)

    host, port = mosquitto_broker
    received = mqtt_subscriber("inspection/types-line/verdict", "types-plc")

    cfg = registry_runner_config(
        root,
        TOKEN,
        station="types-line",
        product="tile",
        products=("tile", "impeller"),
        mqtt=MqttConfig(host=host, port=port),
        swap=SwapConfig(enabled=False),
    )
    rt = Runtime.build(cfg)
    defects = [p for p in known_parts if p.label == "defect"][:6]
    good = next(p for p in known_parts if p.label == "ok")
    answers = {}
    with serve_in_thread(create_app(cfg, rt)) as url, httpx.Client(base_url=url, headers=HEADERS) as h:
        assert rt.wait_ready(120), {p: s.swapper.last_error for p, s in rt.slots.items()}
        assert h.get("/readyz").json()["products"]["tile"]["defect_types"] == list(TYPES)
        for i, part in enumerate(defects):
            answers[f"d{i}"] = h.post("/v1/inspect", content=part.path.read_bytes(), params={"part_id": f"d{i}"})
        answers["ok"] = h.post("/v1/inspect", content=good.path.read_bytes(), params={"part_id": "ok"})
        answers["plain"] = h.post(
            "/v1/inspect", content=defects[0].path.read_bytes(), params={"part_id": "plain", "product": "impeller"}
        )
        published = {}
        while len(published) < len(answers):
            result = InspectionResult.model_validate_json(received.get(timeout=15).payload)
            published[result.request_id] = result
    got = {k: InspectionResult.model_validate_json(r.text) for k, r in answers.items()}
    assert all(r.status_code == 200 for r in answers.values()), {k: r.text for k, r in answers.items()}
    for i in range(len(defects)):
        r = got[f"d{i}"]
        assert r.verdict == "reject" and r.product == "tile" and r.model_version == "typed-1"
        assert r.defect_type == assigned_type(i) and r.defect_type_probability > 0.9
        row = rt.store.get_row(r.request_id)
        assert row["defect_type"] == r.defect_type
        assert row["defect_type_probability"] == pytest.approx(r.defect_type_probability)
        assert published[r.request_id] == r  # the MQTT payload carries the type too
    assert got["ok"].verdict == "pass" and got["ok"].defect_type is None  # a passed part names no defect
    plain = got["plain"]
    assert plain.verdict == "reject" and plain.model_version == "plain-1" and plain.product == "impeller"
    assert plain.defect_type is None and plain.defect_type_probability is None  # an untyped model: None
    assert published[plain.request_id].defect_type is None


def test_cli_inspect_answers_the_product_and_the_type(typed_export: Path, known_parts: list[Part], tmp_path, capsys):
    from inspection.cli import main

    root = tmp_path / "registry"
    reg = Registry(root, product="tile")
    reg.register(typed_export)
    reg.promote("typed-1", reason="typed model", force=True)
    defect = next(p for p in known_parts if p.label == "defect")  # the first defect part: assigned_type(0)
    good = next(p for p in known_parts if p.label == "ok")
    args = ["runner", "inspect", str(defect.path), str(good.path), "--registry", str(root), "--product", "tile"]
    assert main(args) == 0
    lines = [InspectionResult.model_validate_json(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [(r.product, r.verdict, r.defect_type) for r in lines] == [
        ("tile", "reject", assigned_type(0)),
        ("tile", "pass", None),
    ]
    assert main(["runner", "inspect", str(good.path), "--registry", str(root)]) == 1  # no default product here
    assert "no 'production' alias for product 'default'" in capsys.readouterr().err
