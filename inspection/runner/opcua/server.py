"""The runner's OPC UA server (asyncua): the PLC triggers an inspection and reads the verdict, OPC 40100 style.

One object per station (`opcua.stations`, default the runner's own), in the namespace `opcua.namespace`, with
string node ids `ns=<idx>;s=<station>/...` (the README's "Connecting a PLC" lists them all):
- state: `State` (Ready | Busy | Error), `StateCode` (1 | 2 | 3), `ModelVersion`, `Provider`, `DriftAlarm`,
  `Product` (each station is fixed to one product: `station_products`, else the runner's `product`);
- trigger: `Inspect(PartId, ImagePath)` and `InspectImage(PartId, Image)`; both return the result and write it;
- result: `Result/PartId`, `Result/Verdict`, `Result/VerdictCode`, `Result/DefectScore`, `Result/DefectType`
  (and `Result/DefectTypeProbability`: a flagged part judged by a model that learned defect types),
  `Result/ReasonCode`, ... and `Result/ResultCounter`, written last, once per result, plus a `ResultReady`
  event carrying the same fields at once.
Every call goes through the HTTP endpoint's decision path (decide.py): fail-closed, stored before it answers.

The server runs in its own thread with its own asyncio loop, so OPC UA's crypto and encoding never sit in the
HTTP event loop; model calls still go through the one micro-batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asyncua import Server, ua
from asyncua.common.connection import TransportLimits
from prometheus_client import Counter

from inspection.errors import ConfigError
from inspection.runner.opcua.decide import HeldPart, inspect_bytes, read_image_file, reason_code
from inspection.runner.opcua.security import (
    PasswordUserManager,
    certificate_fingerprint,
    ensure_server_certificate,
    load_trusted_clients,
    load_users,
    pinned_client_validator,
)
from inspection.runner.service import _ID_RE
from inspection.schemas import InspectionResult

if TYPE_CHECKING:
    from inspection.runner.runtime import Runtime

logger = logging.getLogger(__name__)

VERDICT_CODES = {"": 0, "pass": 1, "review": 2, "reject": 3}  # 0: no result yet; a PLC switches on these
STATE_CODES = {"Ready": 1, "Busy": 2, "Error": 3}
NO_SCORE = -1.0  # DefectScore of a part held without a model verdict (PLCs handle NaN badly)
NO_TIME = datetime(1601, 1, 1, tzinfo=UTC)  # OPC UA's "no date"
V = ua.VariantType
EVENT_TYPE = "ResultReadyEventType"

# Result variables in the order they are written; ResultCounter goes last so a PLC that watches it reads a
# complete result once it moves.
RESULT_FIELDS: tuple[tuple[str, ua.VariantType, Any, str], ...] = (
    ("PartId", V.String, "", "part id given with the trigger"),
    ("RequestId", V.String, "", "decision id in the store (GET /v1/results/{id}, MQTT payload)"),
    ("Verdict", V.String, "", "pass | review | reject ('' before the first result)"),
    ("VerdictCode", V.Int32, 0, "0 none yet, 1 pass, 2 review, 3 reject"),
    ("DefectScore", V.Double, NO_SCORE, "model defect probability 0..1; -1 when held without a model verdict"),
    ("DefectType", V.String, "", "defect class where the model has types; '' for an ok/defect model"),
    ("DefectTypeProbability", V.Double, NO_SCORE, "the model's probability of DefectType; -1 when there is none"),
    ("ReasonCode", V.String, "", "why a part is held without a model verdict ('' for a model verdict)"),
    ("Reason", V.String, "", "the reason in words"),
    ("ModelVersion", V.String, "", "model version that judged it"),
    ("Timestamp", V.DateTime, NO_TIME, "when the verdict was given (UTC)"),
    ("LatencyMs", V.Double, 0.0, "trigger received to verdict ready"),
    ("ResultCounter", V.UInt32, 0, "+1 per result, written last"),
)
# what each method returns, in order
OUTPUTS: tuple[tuple[str, ua.VariantType, str], ...] = (
    ("RequestId", V.String, "decision id in the store"),
    ("Verdict", V.String, "pass | review | reject"),
    ("VerdictCode", V.Int32, "1 pass, 2 review, 3 reject"),
    ("DefectScore", V.Double, "0..1; -1 when held without a model verdict"),
    ("DefectType", V.String, "'' when the model has no defect types"),
    ("ReasonCode", V.String, "'' for a model verdict, else why the part is held"),
    ("ModelVersion", V.String, "model version that judged it"),
    ("ResultCounter", V.UInt32, "the ResultCounter value this result was written with"),
    ("Timestamp", V.DateTime, "when the verdict was given (UTC)"),
)
# what each method takes, in order: the part id, then the image file's path (Inspect) or its bytes (InspectImage)
_PART_ID = ("PartId", V.String, "part id (1-256 letters, digits, ._-:/#)")
INPUTS: dict[str, tuple[tuple[str, ua.VariantType, str], ...]] = {
    "Inspect": (_PART_ID, ("ImagePath", V.String, "image file the camera wrote, under opcua.image_roots")),
    "InspectImage": (_PART_ID, ("Image", V.ByteString, "the encoded image file (JPEG, PNG, BMP, TIFF)")),
}
STATE_FIELDS: tuple[tuple[str, ua.VariantType, Any], ...] = (
    ("State", V.String, "Error"),  # Error until a verified model serves
    ("StateCode", V.Int32, STATE_CODES["Error"]),
    ("ModelVersion", V.String, ""),  # the version serving now
    ("Provider", V.String, ""),  # onnxruntime execution provider it runs on
    ("DriftAlarm", V.Boolean, False),  # the drift monitor's alarm for the serving model
    ("Product", V.String, ""),  # the product (part type) this station inspects; its model is the one serving
)
_STATE_TYPES = {name: vt for name, vt, _ in STATE_FIELDS}
EVENT_FIELDS = ("PartId", "RequestId", "Verdict", "VerdictCode", "DefectScore", "DefectType", "ReasonCode")
EVENT_FIELDS += ("ModelVersion", "ResultCounter")
_TYPES = {name: vt for name, vt, _, _ in RESULT_FIELDS}


def defect_type_of(result: InspectionResult) -> str:
    """The most likely defect type of a flagged part judged by a typed model; '' otherwise."""
    return result.defect_type or ""


def result_values(result: InspectionResult, counter: int) -> dict[str, Any]:
    """Result variable name -> value, for a result written with ResultCounter `counter`."""
    verdict = result.verdict.value
    return {
        "PartId": result.part_id,
        "RequestId": result.request_id,
        "Verdict": verdict,
        "VerdictCode": VERDICT_CODES[verdict],
        "DefectScore": float(result.defect_score) if result.defect_score is not None else NO_SCORE,
        "DefectType": defect_type_of(result),
        "DefectTypeProbability": (
            float(result.defect_type_probability) if result.defect_type_probability is not None else NO_SCORE
        ),
        "ReasonCode": reason_code(result),
        "Reason": result.reason or "",
        "ModelVersion": result.model_version or "",
        "Timestamp": result.timestamp,
        "LatencyMs": float(result.latency_ms),
        "ResultCounter": counter,
    }


def _argument(name: str, vtype: ua.VariantType, description: str) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(vtype.value)  # builtin data type ids equal the variant type numbers
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(description)
    return arg


@dataclass
class _Station:
    """The nodes of one station object and its result counter (touched only in the server's loop)."""

    name: str
    obj: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # state variable name -> Node
    result: dict[str, Any] = field(default_factory=dict)  # result variable name -> Node
    events: Any = None  # EventGenerator of ResultReady
    counter: int = 0
    inflight: int = 0
    last_state: dict[str, Any] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one result written at a time, never interleaved


class OpcUaServer:
    """Build with the runtime (checks users and certificates at once), `start()` / `stop()` with it."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        cfg = rt.config.opcua
        rt.config.validate()
        if not cfg.endpoint:
            raise ConfigError("OpcUaServer needs opcua.endpoint (e.g. opc.tcp://0.0.0.0:4840)")
        self.config = cfg
        self.endpoint = cfg.endpoint
        self.stations = rt.config.opcua_stations
        self.application_uri = cfg.application_uri or f"urn:{socket.gethostname()}:inspection:runner"
        r = rt.metrics.registry
        self.refused = Counter(
            "inspection_runner_opcua_sessions_refused_total", "OPC UA sessions refused, by kind", ["kind"], registry=r
        )
        self.calls = Counter("inspection_runner_opcua_calls_total", "OPC UA trigger calls", ["method"], registry=r)
        users = load_users(cfg.users_file)
        if not users and not cfg.insecure:
            raise ConfigError(
                "OPC UA has no users: create a users file (inspection runner opcua-user NAME --users-file FILE, then "
                "opcua.users_file) or set INSPECTION_OPCUA_USER and INSPECTION_OPCUA_PASSWORD"
            )
        self.user_manager = PasswordUserManager(users, allow_anonymous=cfg.insecure, on_refused=self._count_refused)
        self.trusted = load_trusted_clients(cfg.trusted_clients) if cfg.trusted_clients else None
        self.cert_dir = Path(cfg.cert_dir) if cfg.cert_dir else rt.store.media_dir / "opcua"
        self.cert_path, self.key_path = ensure_server_certificate(
            self.cert_dir, self.application_uri, cfg.hostnames, cfg.cert_days
        )
        # asyncua logs every call at INFO with its arguments: that would put whole images into the log
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        self._stations: dict[str, _Station] = {}
        self._by_node: dict[ua.NodeId, _Station] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.namespace_index: int | None = None

    def _count_refused(self, kind: str) -> None:
        self.refused.labels(kind).inc()

    # -- lifecycle (called from the runner's thread) -------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="opcua-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"OPC UA server on {self.endpoint} did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"OPC UA server on {self.endpoint} failed to start: {self._error}") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (the server failed)
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # a start-up failure is reported by start(); later ones are logged
            if not self._started.is_set():
                self._error = exc
            else:
                logger.exception("OPC UA server stopped with an error")
        finally:
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await self._build()
        async with server:
            self._log_start()
            self._started.set()
            poll = asyncio.create_task(self._poll_state())
            try:
                await self._stop.wait()
            finally:
                poll.cancel()

    def _log_start(self) -> None:
        cfg = self.config
        if cfg.insecure:
            logger.warning(
                "OPC UA on %s is INSECURE (--opcua-insecure): SecurityPolicy None and anonymous sessions are open, "
                "passwords and verdicts travel in clear text. For a lab only, never on a production line.",
                self.endpoint,
            )
        logger.info(
            "OPC UA server %s (namespace %s = ns=%s), stations %s; Basic256Sha256 Sign / SignAndEncrypt, %d users, "
            "client certificates %s; server certificate %s (SHA-256 %s)",
            self.endpoint,
            cfg.namespace,
            self.namespace_index,
            ", ".join(self.stations),
            len(self.user_manager.users),
            "pinned" if self.trusted else "any (the user name and password are the gate)",
            self.cert_path,
            certificate_fingerprint(self.cert_path),
        )

    # -- address space -------------------------------------------------------------------------------------

    async def _build(self) -> Server:
        cfg = self.config
        server = Server(user_manager=self.user_manager)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"inspection runner ({self.rt.config.station})")
        server.product_uri = "urn:inspection:runner"
        server.manufacturer_name = "inspection"
        await server.set_application_uri(self.application_uri)
        await server.load_certificate(str(self.cert_path))
        await server.load_private_key(str(self.key_path))
        policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign]
        tokens: list[type] = [ua.UserNameIdentityToken]
        if cfg.insecure:
            policies.append(ua.SecurityPolicyType.NoSecurity)
            tokens.append(ua.AnonymousIdentityToken)
        server.set_security_policy(policies)
        server.set_identity_tokens(tokens)
        if self.trusted is not None:
            server.set_certificate_validator(pinned_client_validator(self.trusted))
        # one message must hold the largest image the runner accepts, and no more
        max_msg = self.rt.config.image_limits.max_bytes + 1_048_576
        server.limits = TransportLimits(
            max_recv_buffer=65535, max_send_buffer=65535, max_chunk_count=max_msg // 65535 + 1, max_message_size=max_msg
        )
        idx = await server.register_namespace(cfg.namespace)
        self.namespace_index = idx
        # the event type by hand: asyncua's create_custom_event_type gives its fields numeric ids that clash
        # with a string id for the type itself
        base = server.get_node(ua.NodeId(ua.ObjectIds.BaseEventType))
        etype = await base.add_object_type(ua.NodeId(EVENT_TYPE, idx), ua.QualifiedName(EVENT_TYPE, idx))
        for name in EVENT_FIELDS:
            prop = await etype.add_property(
                ua.NodeId(f"{EVENT_TYPE}/{name}", idx),
                ua.QualifiedName(name, idx),
                ua.get_default_value(_TYPES[name]),
                varianttype=_TYPES[name],
            )
            await prop.set_modelling_rule(True)
        for name in self.stations:
            st = await self._add_station(server, idx, name)
            st.events = await server.get_event_generator(etype, st.obj)
            self._stations[name] = st
            self._by_node[st.obj.nodeid] = st
        return server

    async def _add_station(self, server: Server, idx: int, name: str) -> _Station:
        st = _Station(name)
        st.obj = await server.nodes.objects.add_object(ua.NodeId(name, idx), ua.QualifiedName(name, idx))
        for var, vtype, value in STATE_FIELDS:
            node_id, qname = ua.NodeId(f"{name}/{var}", idx), ua.QualifiedName(var, idx)
            st.state[var] = await st.obj.add_variable(node_id, qname, value, vtype)
        for method, handler in (("Inspect", self._inspect_path), ("InspectImage", self._inspect_image)):
            await st.obj.add_method(
                ua.NodeId(f"{name}/{method}", idx),
                ua.QualifiedName(method, idx),
                handler,
                [_argument(*i) for i in INPUTS[method]],
                [_argument(*o) for o in OUTPUTS],
            )
        result = await st.obj.add_object(ua.NodeId(f"{name}/Result", idx), ua.QualifiedName("Result", idx))
        for var, vtype, value, description in RESULT_FIELDS:
            node = await result.add_variable(
                ua.NodeId(f"{name}/Result/{var}", idx), ua.QualifiedName(var, idx), value, vtype
            )
            await node.write_attribute(ua.AttributeIds.Description, ua.DataValue(ua.LocalizedText(description)))
            st.result[var] = node
        return st  # nothing is made writable: clients read, only the runner writes

    # -- state ---------------------------------------------------------------------------------------------

    def _state_values(self, st: _Station) -> dict[str, Any]:
        slot = self.rt.slot_for_station(st.name)  # its product's model and drift monitor (checked at start)
        current = slot.holder.current
        state = "Error" if current is None else ("Busy" if st.inflight else "Ready")
        drift = slot.drift
        return {
            "State": state,
            "StateCode": STATE_CODES[state],
            "ModelVersion": current.version if current else "",
            "Provider": current.provider if current else "",
            "DriftAlarm": bool(drift is not None and getattr(drift, "alarm", False)),
            "Product": slot.product,
        }

    async def _refresh_state(self, st: _Station) -> None:
        values = self._state_values(st)
        for var, value in values.items():
            if st.last_state.get(var) != value:  # only changes: no data-change notifications for nothing
                await st.state[var].write_value(ua.Variant(value, _STATE_TYPES[var]))
        st.last_state = values

    async def _poll_state(self) -> None:
        while True:
            for st in self._stations.values():
                try:
                    await self._refresh_state(st)
                except Exception:
                    logger.exception("OPC UA: state of %s not updated", st.name)
            await asyncio.sleep(self.config.state_poll_s)

    # -- methods -------------------------------------------------------------------------------------------

    def _station_of(self, parent: ua.NodeId) -> _Station:
        st = self._by_node.get(parent)
        if st is None:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadNodeIdInvalid)
        return st

    @staticmethod
    def _part_id(arg: Any) -> tuple[str | None, HeldPart | None]:
        value = getattr(arg, "Value", None)
        if value is None or value == "":
            return None, None  # held as missing_part_id on the decision path
        if not isinstance(value, str) or not _ID_RE.match(value):
            return "unknown", HeldPart("bad_field", "PartId must be 1-256 characters of letters, digits, ._-:/#")
        return value, None

    async def _inspect_path(self, parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant]:
        t0 = time.perf_counter()
        st = self._station_of(parent)
        self.calls.labels("Inspect").inc()
        part_id, held = self._part_id(args[0] if args else None)
        data = b""
        path = getattr(args[1], "Value", None) if len(args) > 1 else None
        if held is None:
            if len(args) != 2 or not isinstance(path, str):
                held = HeldPart("bad_field", "Inspect takes (PartId: String, ImagePath: String)")
            else:
                try:
                    limit = self.rt.config.image_limits.max_bytes
                    data = await asyncio.to_thread(read_image_file, path, self.config.image_roots, limit)
                except HeldPart as exc:
                    held = exc
        return await self._decide(st, part_id, data, t0, held)

    async def _inspect_image(self, parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant]:
        t0 = time.perf_counter()
        st = self._station_of(parent)
        self.calls.labels("InspectImage").inc()
        part_id, held = self._part_id(args[0] if args else None)
        image = getattr(args[1], "Value", None) if len(args) > 1 else None
        if held is None and (len(args) != 2 or not isinstance(image, bytes | None)):
            held = HeldPart("bad_field", "InspectImage takes (PartId: String, Image: ByteString)")
        data = image if isinstance(image, bytes) else b""  # a null ByteString is an empty image: held as 'empty'
        return await self._decide(st, part_id, data, t0, held)

    async def _decide(
        self, st: _Station, part_id: str | None, data: bytes, t0: float, held: HeldPart | None
    ) -> list[ua.Variant]:
        st.inflight += 1
        try:
            await self._refresh_state(st)
            result = await inspect_bytes(self.rt, data, part_id, st.name, t0, held)
        finally:
            st.inflight -= 1
        counter = await self._publish(st, result)
        await self._refresh_state(st)
        values = result_values(result, counter)
        return [ua.Variant(values[name], vtype) for name, vtype, _ in OUTPUTS]

    async def _publish(self, st: _Station, result: InspectionResult) -> int:
        """Write the result variables (ResultCounter last) and fire ResultReady: once per result, in one piece."""
        async with st.lock:
            st.counter += 1
            counter = st.counter
            values = result_values(result, counter)
            try:
                for var, vtype, _, _ in RESULT_FIELDS:
                    await st.result[var].write_value(ua.Variant(values[var], vtype))
                for name in EVENT_FIELDS:  # plain values: the event knows each field's type
                    setattr(st.events.event, name, values[name])
                held = f" ({values['ReasonCode']})" if result.reason else ""
                message = f"{result.part_id}: {values['Verdict']}{held}"
                await st.events.trigger(time_attr=result.timestamp, message=message)
            except Exception:  # the decision is stored and the caller gets it: the variables are telemetry
                logger.exception("OPC UA: result %s of %s not written to the address space", counter, st.name)
            return counter
