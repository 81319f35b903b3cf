"""The runner's OPC UA server, real asyncua server in-process on a free loopback port, real asyncua clients.

One runner (fake model: score = mean pixel / 255) serves HTTP and OPC UA from the same Runtime for the module;
each test talks to it over Basic256Sha256 SignAndEncrypt with a user from a users file, as a PLC would.
"""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.common.subscription import Subscription
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi.testclient import TestClient

from inspection.images import encode_jpeg, encode_png
from inspection.runner import RunnerConfig, Runtime, create_app
from inspection.runner.config import AuthConfig, OpcUaConfig
from inspection.runner.opcua import OUTPUTS
from inspection.runner.opcua.security import CERT_FILE, KEY_FILE, ensure_server_certificate, write_user
from tests.fixtures.serving import bad_inputs, fake_inferencer, free_port, sample_frame

pytestmark = pytest.mark.timeout(180)

STATION = "cell-3"
NS = "urn:inspection:runner"
USER, PASSWORD = "plc", "line-3-password"
CLIENT_URI = "urn:test:plc-client"
SAE = ua.MessageSecurityMode.SignAndEncrypt


@pytest.fixture(scope="module")
def client_cert(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("plc-cert")
    key, cert = d / "plc_key.pem", d / "plc_cert.der"
    asyncio.run(
        setup_self_signed_certificate(
            key, cert, CLIENT_URI, "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "test plc"}
        )
    )
    return cert, key


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """HTTP (TestClient) and OPC UA on one Runtime; yields (runtime, http client, port, image root)."""
    d = tmp_path_factory.mktemp("opcua-runner")
    users = d / "opcua_users"
    write_user(users, USER, PASSWORD)
    write_user(users, "scada", "another-password")
    images = d / "camera"
    images.mkdir()
    port = free_port()
    cfg = RunnerConfig(
        store=str(d / "store"),
        station=STATION,
        auth=AuthConfig(required=False),
        opcua=OpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{port}", users_file=users, image_roots=(images,)),
    )
    rt = Runtime.build(cfg)
    rt.holder.swap(fake_inferencer())
    with TestClient(create_app(cfg, rt)) as http:  # the lifespan starts the OPC UA server with the runtime
        yield rt, http, port, images


async def _connect(port, cert, server_cert, user=USER, password=PASSWORD, mode=SAE, security=True) -> Client:
    """A connected client as a PLC opens it: Basic256Sha256 with its own certificate, trusting the runner's."""
    c = Client(f"opc.tcp://127.0.0.1:{port}", timeout=30)
    c.application_uri = CLIENT_URI
    if user is not None:
        c.set_user(user)
        c.set_password(password)
    if security:
        cert_path, key_path = cert
        await c.set_security(
            SecurityPolicyBasic256Sha256, str(cert_path), str(key_path), server_certificate=server_cert, mode=mode
        )
    await c.connect()
    return c


class _Nodes:
    def __init__(self, c: Client, idx: int):
        self.c, self.idx = c, idx
        self.station = c.get_node(ua.NodeId(STATION, idx))

    def node(self, path: str):
        return self.c.get_node(ua.NodeId(f"{STATION}/{path}", self.idx))

    async def call(self, method: str, *args) -> dict:
        out = await self.station.call_method(ua.NodeId(f"{STATION}/{method}", self.idx), *args)
        return dict(zip([name for name, _, _ in OUTPUTS], out, strict=True))

    async def result(self) -> dict:
        names = ["PartId", "RequestId", "Verdict", "VerdictCode", "DefectScore", "DefectType", "ReasonCode"]
        names += ["ModelVersion", "ResultCounter", "Timestamp"]
        return {n: await self.node(f"Result/{n}").read_value() for n in names}


async def _session(port, cert, rt, **kw) -> tuple[Client, _Nodes]:
    c = await _connect(port, cert, str(rt.opcua.cert_path), **kw)
    return c, _Nodes(c, await c.get_namespace_index(NS))


async def _eventually(node, value, timeout: float = 5.0) -> bool:
    """True once `node` reads `value` (state variables follow the runtime every opcua.state_poll_s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await node.read_value() != value:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class _Events:
    def __init__(self):
        self.events = []

    def event_notification(self, event):
        self.events.append(event)

    async def wait_for(self, count: int, tries: int) -> None:
        """Until `count` events came, polling `tries` times 50 ms apart (the test then checks what came)."""
        for _ in range(tries):
            if len(self.events) >= count:
                break
            await asyncio.sleep(0.05)


async def _subscribe_results(c: Client, n: _Nodes) -> tuple[Subscription, _Events]:
    """A subscription to the station's ResultReady events, and the handler that collects them."""
    handler = _Events()
    sub = await c.create_subscription(20, handler)
    await sub.subscribe_events(n.station, c.get_node(ua.NodeId("ResultReadyEventType", n.idx)))
    return sub, handler


def test_inspect_by_bytes_and_by_path_return_verdict_and_write_result(runner, client_cert):
    rt, http, port, images = runner
    white = encode_jpeg(sample_frame(250))
    black = encode_png(sample_frame(15))
    (images / "part-17.png").write_bytes(black)

    async def main():
        c, n = await _session(port, client_cert, rt)
        try:
            sub, handler = await _subscribe_results(c, n)
            assert await _eventually(n.node("State"), "Ready")  # follows the model within opcua.state_poll_s
            assert await n.node("ModelVersion").read_value() == "fake-1"
            assert await n.node("Provider").read_value() == "FakeExecutionProvider"
            assert await n.node("DriftAlarm").read_value() is False
            before = await n.node("Result/ResultCounter").read_value()
            by_bytes = await n.call("InspectImage", "P-100", white)
            after_bytes = await n.result()
            by_path = await n.call("Inspect", "P-101", str(images / "part-17.png"))
            after_path = await n.result()
            await handler.wait_for(2, tries=50)
            await sub.delete()
            return before, by_bytes, after_bytes, by_path, after_path, handler.events
        finally:
            await c.disconnect()

    before, by_bytes, after_bytes, by_path, after_path, events = asyncio.run(main())
    # by bytes: the white part is rejected with the fake model's score, and the variables say the same
    assert by_bytes["Verdict"] == "reject" and by_bytes["VerdictCode"] == 3 and by_bytes["ReasonCode"] == ""
    assert by_bytes["ResultCounter"] == before + 1 and by_bytes["ModelVersion"] == "fake-1"
    assert by_bytes["DefectType"] == ""  # an ok/defect model has no defect types
    assert after_bytes["PartId"] == "P-100" and after_bytes["Verdict"] == "reject"
    assert after_bytes["VerdictCode"] == 3 and after_bytes["ResultCounter"] == before + 1
    assert after_bytes["RequestId"] == by_bytes["RequestId"]
    assert after_bytes["DefectScore"] == pytest.approx(by_bytes["DefectScore"]) and by_bytes["DefectScore"] > 0.8
    # by path: the black part passes
    assert by_path["Verdict"] == "pass" and by_path["VerdictCode"] == 1 and by_path["DefectScore"] < 0.5
    assert after_path["PartId"] == "P-101" and after_path["ResultCounter"] == before + 2
    # each result fired one ResultReady event with the same fields
    got = {(e.PartId, e.Verdict, e.VerdictCode, e.ResultCounter, e.RequestId) for e in events}
    assert got == {
        ("P-100", "reject", 3, before + 1, by_bytes["RequestId"]),
        ("P-101", "pass", 1, before + 2, by_path["RequestId"]),
    }
    # the same decision path as HTTP: stored before the answer, same verdict and score for the same bytes
    stored = rt.store.get_row(by_bytes["RequestId"])
    assert stored["verdict"] == "reject" and stored["source"] == "opcua" and stored["part_id"] == "P-100"
    assert stored["station"] == STATION and stored["image_path"]  # a reject keeps its image for QA
    r = http.post("/v1/inspect", content=white, headers={"Content-Type": "image/jpeg"}, params={"part_id": "H-1"})
    assert r.status_code == 200
    assert r.json()["verdict"] == "reject" and r.json()["defect_score"] == pytest.approx(by_bytes["DefectScore"])
    assert 'source="opcua"' in http.get("/metrics").text


def test_result_counter_increments_once_per_part_under_4_concurrent_clients(runner, client_cert):
    rt, _, port, _ = runner
    frames = [encode_jpeg(sample_frame(v)) for v in (10, 140, 250)]
    per_client = 12

    async def plc(k: int) -> list[dict]:
        c, n = await _session(port, client_cert, rt)
        try:
            return [await n.call("InspectImage", f"C{k}-{i}", frames[(k + i) % 3]) for i in range(per_client)]
        finally:
            await c.disconnect()

    async def main():
        c, n = await _session(port, client_cert, rt)
        try:
            sub, handler = await _subscribe_results(c, n)
            before = await n.node("Result/ResultCounter").read_value()
            results = await asyncio.gather(*(plc(k) for k in range(4)))
            await handler.wait_for(4 * per_client, tries=100)
            after = await n.node("Result/ResultCounter").read_value()
            await sub.delete()
            return before, results, after, handler.events
        finally:
            await c.disconnect()

    before, results, after, events = asyncio.run(main())
    flat = [r for client_results in results for r in client_results]
    counters = sorted(r["ResultCounter"] for r in flat)
    assert counters == list(range(before + 1, before + 4 * per_client + 1))  # once each, none skipped or doubled
    assert after == before + 4 * per_client
    assert sorted(e.ResultCounter for e in events) == counters  # one event per result
    assert len({r["RequestId"] for r in flat}) == len(flat)
    assert all(rt.store.get_row(r["RequestId"])["source"] == "opcua" for r in flat)
    expected = {0: "pass", 1: "review", 2: "reject"}
    for k, client_results in enumerate(results):
        assert [r["Verdict"] for r in client_results] == [expected[(k + i) % 3] for i in range(per_client)]


def test_unreadable_image_gives_review_with_reason_and_stored_decision(runner, client_cert):
    rt, _, port, images = runner
    truncated = bad_inputs()["truncated_jpeg"][0]
    (images / "half.jpg").write_bytes(truncated)
    outside = images.parent / "secret.jpg"
    outside.write_bytes(encode_jpeg(sample_frame(10)))

    async def main():
        c, n = await _session(port, client_cert, rt)
        try:
            out = {"pass": await n.call("InspectImage", "P-200", encode_jpeg(sample_frame(10)))}
            out["bytes"] = await n.call("InspectImage", "P-201", truncated)
            out["bytes_vars"] = await n.result()
            out["path"] = await n.call("Inspect", "P-202", str(images / "half.jpg"))
            out["missing"] = await n.call("Inspect", "P-203", str(images / "nope.jpg"))
            out["outside"] = await n.call("Inspect", "P-204", str(outside))
            out["dotdot"] = await n.call("Inspect", "P-205", str(images / ".." / "secret.jpg"))
            out["no_part"] = await n.call("InspectImage", "", encode_jpeg(sample_frame(10)))
            out["bad_part"] = await n.call("InspectImage", "bad part id", encode_jpeg(sample_frame(10)))
            out["last_vars"] = await n.result()
            return out
        finally:
            await c.disconnect()

    out = asyncio.run(main())
    assert out["pass"]["Verdict"] == "pass"
    expected = {
        "bytes": "truncated",
        "path": "truncated",
        "missing": "missing_file",
        "outside": "path_not_allowed",
        "dotdot": "path_not_allowed",
        "no_part": "missing_part_id",
        "bad_part": "bad_field",
    }
    for key, code in expected.items():
        res = out[key]
        assert (res["Verdict"], res["VerdictCode"], res["ReasonCode"]) == ("review", 2, code), key
        assert res["DefectScore"] == -1.0 and res["ResultCounter"] > out["pass"]["ResultCounter"]
        row = rt.store.get_row(res["RequestId"])
        assert row is not None and row["verdict"] == "review" and row["reason"].startswith(f"{code}:"), key
        assert row["defect_score"] is None and row["source"] == "opcua"
    # the PLC reading the variables after a bad image sees review, never the previous part's pass
    assert out["bytes_vars"]["Verdict"] == "review" and out["bytes_vars"]["PartId"] == "P-201"
    assert out["bytes_vars"]["ReasonCode"] == "truncated" and out["bytes_vars"]["VerdictCode"] == 2
    assert out["last_vars"]["PartId"] == "unknown" and out["last_vars"]["ReasonCode"] == "bad_field"
    kept = rt.store.get_row(out["bytes"]["RequestId"])["image_path"]
    assert kept and (rt.store.media_dir / kept).read_bytes() == truncated  # QA sees what the camera sent
    assert rt.store.get_row(out["outside"]["RequestId"])["image_path"] is None  # nothing read outside the roots


def test_model_error_and_no_model_give_review(runner, client_cert):
    rt, _, port, _ = runner
    good = rt.holder.current

    async def main():
        c, n = await _session(port, client_cert, rt)
        try:
            rt.holder.swap(fake_inferencer("broken-2", fail=True))
            failed = await n.call("InspectImage", "P-300", encode_jpeg(sample_frame(10)))
            rt.holder.current = None  # no verified model: Error state, parts held
            await _eventually(n.node("State"), "Error")
            state = await n.node("State").read_value(), await n.node("StateCode").read_value()
            none = await n.call("InspectImage", "P-301", encode_jpeg(sample_frame(10)))
            rt.holder.swap(good)
            back = await _eventually(n.node("State"), "Ready")
            return failed, state, none, back
        finally:
            rt.holder.swap(good)
            await c.disconnect()

    failed, state, none, back = asyncio.run(main())
    assert back  # a verified model serves again: Ready
    assert (failed["Verdict"], failed["ReasonCode"]) == ("review", "model_error")
    assert rt.store.get_row(failed["RequestId"])["reason"].startswith("model_error: RuntimeError")
    assert state == ("Error", 3)
    assert (none["Verdict"], none["ReasonCode"]) == ("review", "no_model")
    assert rt.store.get_row(none["RequestId"])["verdict"] == "review"


def test_anonymous_wrong_password_and_plain_sessions_are_refused(runner, client_cert):
    rt, _, port, _ = runner

    async def attempt(**kw) -> BaseException | None:
        try:
            c = await _connect(port, client_cert, str(rt.opcua.cert_path), **kw)
        except Exception as exc:
            return exc
        await c.disconnect()
        return None

    async def endpoints():
        c = Client(f"opc.tcp://127.0.0.1:{port}")
        return await c.connect_and_get_server_endpoints()

    refused_before = rt.metrics.render().decode()
    anonymous = asyncio.run(attempt(user=None))
    wrong = asyncio.run(attempt(password="not-the-password"))
    unknown = asyncio.run(attempt(user="intruder", password=PASSWORD))
    plain = asyncio.run(attempt(security=False))
    right = asyncio.run(attempt())
    eps = asyncio.run(endpoints())
    assert right is None
    assert isinstance(anonymous, ua.UaStatusCodeError) and anonymous.code == ua.StatusCodes.BadIdentityTokenRejected
    assert isinstance(wrong, ua.UaStatusCodeError) and wrong.code == ua.StatusCodes.BadUserAccessDenied
    assert isinstance(unknown, ua.UaStatusCodeError) and unknown.code == ua.StatusCodes.BadUserAccessDenied
    assert plain is not None  # no SecurityPolicy None endpoint to open a session on
    offered = {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode) for e in eps}
    assert offered == {
        ("Basic256Sha256", ua.MessageSecurityMode.Sign),
        ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt),
    }
    for e in eps:  # anonymous is not even offered
        assert {t.TokenType for t in e.UserIdentityTokens} == {ua.UserTokenType.UserName}
    metrics = rt.metrics.render().decode()
    assert 'inspection_runner_opcua_sessions_refused_total{kind="password"}' in metrics
    assert metrics != refused_before


def test_sign_and_encrypt_session_with_generated_certificate(runner, client_cert):
    rt, _, port, _ = runner
    cert_dir = rt.opcua.cert_dir
    assert cert_dir == rt.store.media_dir / "opcua"  # kept with the store
    assert stat.S_IMODE((cert_dir / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_dir.stat().st_mode) == 0o700
    cert_bytes = (cert_dir / CERT_FILE).read_bytes()
    # a second start reuses it (clients that trust it keep trusting it)
    again = ensure_server_certificate(cert_dir, rt.opcua.application_uri)
    assert again == (cert_dir / CERT_FILE, cert_dir / KEY_FILE) and (cert_dir / CERT_FILE).read_bytes() == cert_bytes

    async def main(mode):
        c, n = await _session(port, client_cert, rt, mode=mode)
        try:
            server_cert = c.security_policy.peer_certificate
            policy = c.security_policy.URI
            res = await n.call("InspectImage", f"P-enc-{mode.name}", encode_jpeg(sample_frame(250)))
            try:
                await n.node("Result/Verdict").write_value("pass")  # a client must not forge a verdict
                write_error = None
            except ua.UaStatusCodeError as exc:
                write_error = exc
            return server_cert, policy, res, write_error, await n.node("Result/Verdict").read_value()
        finally:
            await c.disconnect()

    for mode in (SAE, ua.MessageSecurityMode.Sign):
        server_cert, policy, res, write_error, verdict = asyncio.run(main(mode))
        assert policy.endswith("#Basic256Sha256")
        assert server_cert == cert_bytes  # the session runs on the certificate the runner made
        assert res["Verdict"] == "reject"
        assert write_error is not None and verdict == "reject"


def test_insecure_lab_mode_is_logged_loudly(tmp_path, client_cert, caplog):
    port = free_port()
    cfg = RunnerConfig(
        store=str(tmp_path / "store"),
        station=STATION,
        auth=AuthConfig(required=False),
        opcua=OpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{port}", insecure=True),
    )
    rt = Runtime.build(cfg)  # no users at all: allowed only because it is insecure
    rt.holder.swap(fake_inferencer())
    caplog.set_level(logging.WARNING, logger="inspection.runner.opcua")
    rt.start()
    try:

        async def main():
            c = Client(f"opc.tcp://127.0.0.1:{port}", timeout=30)
            async with c:
                n = _Nodes(c, await c.get_namespace_index(NS))
                return await n.call("InspectImage", "LAB-1", encode_jpeg(sample_frame(10)))

        res = asyncio.run(main())
    finally:
        rt.stop()
    assert res["Verdict"] == "pass"
    loud = [r for r in caplog.records if r.levelno == logging.WARNING and "INSECURE" in r.getMessage()]
    assert loud and "never on a production line" in loud[0].getMessage()


def test_secure_server_without_users_does_not_start(tmp_path, monkeypatch):
    from inspection.errors import ConfigError

    monkeypatch.delenv("INSPECTION_OPCUA_USER", raising=False)
    monkeypatch.delenv("INSPECTION_OPCUA_PASSWORD", raising=False)
    cfg = RunnerConfig(
        store=str(tmp_path / "store"),
        auth=AuthConfig(required=False),
        opcua=OpcUaConfig(endpoint=f"opc.tcp://127.0.0.1:{free_port()}"),
    )
    with pytest.raises(ConfigError, match="no users"):
        Runtime.build(cfg)


def test_example_client_in_deploy_inspects_a_part(runner, tmp_path):
    import os
    import subprocess
    import sys

    rt, _, port, _ = runner
    image = tmp_path / "part.jpg"
    image.write_bytes(encode_jpeg(sample_frame(250)))
    script = Path(__file__).resolve().parents[2] / "deploy" / "opcua_client.py"
    cmd = [sys.executable, str(script), f"opc.tcp://127.0.0.1:{port}", "--server-cert", str(rt.opcua.cert_path)]
    cmd += ["--station", STATION, "--user", USER, "--image", str(image), "--part-id", "EX-1"]
    cmd += ["--client-dir", str(tmp_path / "client")]
    env = {**os.environ, "OPCUA_PASSWORD": PASSWORD}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = [line.partition(":") for line in out.stdout.splitlines()[1:]]  # after "station ...: Ready, ..."
    fields = {name.strip(): value.strip() for name, _, value in lines}
    assert fields["Verdict"] == "reject" and fields["VerdictCode"] == "3"
    assert rt.store.get_row(fields["RequestId"])["part_id"] == "EX-1"
