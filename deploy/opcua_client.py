"""Example OPC UA client for the inspection runner: what a PLC or SCADA does, as a short asyncua script.

    python deploy/opcua_client.py opc.tcp://line3-pc:4840 --server-cert server_cert.der --station cell-3 \
        --user plc --image part-17.jpg --part-id P-17          # InspectImage: send the bytes
    python deploy/opcua_client.py ... --path /camera/part-17.jpg --part-id P-17   # Inspect: the runner reads it
    python deploy/opcua_client.py ... --watch                                  # print every ResultReady event

The password comes from OPCUA_PASSWORD (or a prompt). The session is Basic256Sha256 SignAndEncrypt with this
client's own certificate (made in --client-dir on first run) and trusts only the runner's certificate
(`STORE/opcua/server_cert.der`, copied from the runner box). See the README section "Connecting a PLC".
"""

import argparse
import asyncio
import getpass
import os
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography.x509.oid import ExtendedKeyUsageOID

NAMESPACE = "urn:inspection:runner"
CLIENT_URI = "urn:example:inspection-plc-client"
OUTPUTS = ["RequestId", "Verdict", "VerdictCode", "DefectScore", "DefectType", "ReasonCode", "ModelVersion"]
OUTPUTS += ["ResultCounter", "Timestamp"]


class PrintEvents:
    def event_notification(self, event) -> None:
        e = event
        print(f"ResultReady #{e.ResultCounter}: {e.PartId} {e.Verdict} ({e.VerdictCode}) {e.ReasonCode}".rstrip())


async def main(a: argparse.Namespace) -> None:
    a.client_dir.mkdir(parents=True, exist_ok=True)
    key, cert = a.client_dir / "client_key.pem", a.client_dir / "client_cert.der"
    await setup_self_signed_certificate(
        key, cert, CLIENT_URI, "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {"commonName": "inspection client"}
    )
    client = Client(a.url, timeout=10)
    client.application_uri = CLIENT_URI  # must match the URI in our certificate
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(cert),
        str(key),
        server_certificate=str(a.server_cert),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    client.set_user(a.user)
    client.set_password(os.environ.get("OPCUA_PASSWORD") or getpass.getpass(f"password for {a.user}: "))
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)  # resolve by URI: the index may differ per server
        station = client.get_node(ua.NodeId(a.station, idx))
        state = await client.get_node(ua.NodeId(f"{a.station}/State", idx)).read_value()
        version = await client.get_node(ua.NodeId(f"{a.station}/ModelVersion", idx)).read_value()
        print(f"station {a.station}: {state}, model {version}")
        if a.watch:
            sub = await client.create_subscription(100, PrintEvents())
            await sub.subscribe_events(station, client.get_node(ua.NodeId("ResultReadyEventType", idx)))
            await asyncio.Event().wait()  # until Ctrl-C
        method, arg = ("InspectImage", a.image.read_bytes()) if a.image else ("Inspect", a.path)
        out = await station.call_method(ua.NodeId(f"{a.station}/{method}", idx), a.part_id, arg)
        for name, value in zip(OUTPUTS, out, strict=True):
            print(f"{name:>13}: {value}")
        # a PLC switches on VerdictCode: 1 pass, 2 review (hold the part), 3 reject; a failed call = review


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="opc.tcp://HOST:PORT of the runner")
    p.add_argument("--server-cert", type=Path, required=True, help="the runner's server_cert.der")
    p.add_argument("--station", default="station-1")
    p.add_argument("--user", default="plc")
    p.add_argument("--part-id", default="P-1")
    p.add_argument("--client-dir", type=Path, default=Path("opcua_client"), help="this client's key + certificate")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=Path, help="send this image file's bytes (InspectImage)")
    what.add_argument("--path", help="ask the runner to read this path (Inspect; under its image roots)")
    what.add_argument("--watch", action="store_true", help="print every ResultReady event")
    asyncio.run(main(p.parse_args()))
