"""RunnerConfig: everything the line-side runner can be told, with why each default is what it is."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from inspection.drift import DriftConfig
from inspection.errors import ConfigError
from inspection.images import ImageLimits

TOKEN_ENV = "INSPECTION_RUNNER_TOKEN"
OPCUA_USER_ENV = "INSPECTION_OPCUA_USER"  # one OPC UA user from the environment (containers, systemd credentials)
OPCUA_PASSWORD_ENV = "INSPECTION_OPCUA_PASSWORD"
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"  # loopback unless the operator opens it on purpose
    port: int = 8080  # one process only: the micro-batcher needs every request in one queue


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 16  # CPU gains little past 16; a GPU deployment raises it (e.g. 64)
    max_wait_ms: float = 2.0  # waited only while other requests are being decoded, so one client pays nothing
    queue_limit: int = 256  # beyond this the runner is overloaded: answer 503 (part held) instead of queueing
    timeout_s: float = 5.0  # an answer later than this is useless to the line: 503 + review
    workers: int = 3  # threads calling the model: batches overlap with the hand-back of others (bench/runner.py)


SPINNING = ("always", "within_run", "never")


@dataclass(frozen=True)
class AuthConfig:
    token: str | None = None  # bearer token; INSPECTION_RUNNER_TOKEN in the environment wins over the file
    required: bool = True  # inspect/results/admin endpoints refuse requests without the token
    health: bool = False  # /healthz and /readyz are probed by orchestrators that carry no token
    metrics: bool = False  # Prometheus scrapes usually come from the plant network without a token


@dataclass(frozen=True)
class MqttConfig:
    host: str | None = None  # no broker configured: verdicts go over HTTP/folder only
    port: int = 1883
    topic_prefix: str = "inspection"  # topic = <prefix>/<station>/verdict
    qos: int = 1  # at-least-once: the PLC side de-duplicates by request_id
    client_id: str | None = None  # default inspection-runner-<station>
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 30
    # the outbox (verdicts waiting in the decision store until the broker has acknowledged them, outbox.py)
    outbox_batch: int = 100  # rows published before waiting for their PUBACKs: drains a backlog fast, in order
    outbox_poll_s: float = 0.5  # re-check the outbox (and the backlog gauge) this often when nothing wakes it
    outbox_max_rows: int = 1_000_000  # ~0.6 GB of SQLite: past this the oldest are dropped (logged, counted)


@dataclass(frozen=True)
class OpcUaConfig:
    endpoint: str | None = None  # e.g. opc.tcp://0.0.0.0:4840; None: no OPC UA server
    insecure: bool = False  # lab only: also SecurityPolicy None and anonymous sessions (logged as a WARNING)
    users_file: Path | None = None  # lines "name:argon2-hash" (inspection runner opcua-user); plus the env user
    cert_dir: Path | None = None  # server certificate + private key; default <media dir of the store>/opcua
    trusted_clients: Path | None = None  # folder of client certificates (DER/PEM); None: any client cert + a user
    stations: tuple[str, ...] = ()  # one object per station; default: the runner's own station
    image_roots: tuple[Path, ...] = ()  # Inspect(part_id, image_path) reads only below these; none: by path refused
    namespace: str = "urn:inspection:runner"  # namespace URI of our nodes (clients resolve its index by URI)
    application_uri: str | None = None  # default urn:<hostname>:inspection:runner (also in the certificate)
    hostnames: tuple[str, ...] = ()  # extra DNS names / IPs for the certificate (the hostname is always in)
    cert_days: int = 1825  # self-signed, made on first start; renewed (new file) only when it expires
    state_poll_s: float = 0.5  # how fast State/ModelVersion/DriftAlarm follow a model swap or a drift alarm


@dataclass(frozen=True)
class FolderConfig:
    watch: Path | None = None  # camera drop folder; None: folder mode off
    poll_s: float = 0.25  # polling works on every filesystem (NFS/SMB shares included), inotify does not
    settle_s: float = 0.2  # a file younger than this may still be being written by the camera
    results: Path | None = None  # JSON lines; default <watch>/results.jsonl
    processed_dir: Path | None = None  # default <watch>/processed
    flagged_dir: Path | None = None  # default <watch>/flagged


@dataclass(frozen=True)
class SwapConfig:
    enabled: bool = True  # follow the registry's alias: a promotion reaches the line without a restart
    poll_s: float = 1.0  # aliases.json is tiny; checking its mtime each second costs nothing
    smoke_runs: int = 1  # inference runs on a synthetic image before a new model may serve


@dataclass(frozen=True)
class RunnerConfig:
    registry: Path | None = None  # model registry root; the runner serves each product's `alias` version
    station: str = "station-1"  # station id: default for requests that do not name one, and the MQTT topic
    alias: str = "production"
    # products (registry.py): each served one has its own model, hot swap, rollback and drift monitor.
    # A request names its product (`product` field / X-Product), or its station has one fixed in
    # `station_products`, or it gets `product`; null: a request must say (fail-closed instead of a guess)
    product: str | None = "default"  # "default": the registry folder's own (single-product) aliases
    products: tuple[str, ...] = ()  # every product served; empty: just `product`
    station_products: dict[str, str] = field(default_factory=dict)  # station -> its one product (OPC UA, folder)
    model_file: str = "model.onnx"  # or "model.int8.onnx" where the version has one and the CPU gains from it
    store: str = "runner_store"  # decision store: a directory (SQLite inside), a .sqlite path or a DB URL
    media_dir: Path | None = None  # kept images/heatmaps; default: next to the SQLite file
    providers: tuple[str, ...] = DEFAULT_PROVIDERS  # tried in order; the first that really runs is used
    threads: int | None = None  # onnxruntime intra-op threads; None: all cores
    # onnxruntime's intra-op threads busy-wait: "always" (its default: they eat the CPU HTTP needs on a 2-core box),
    # "within_run" (fast hand-offs inside a run, stopped when it returns), "never" (bench/runner.py, README)
    spinning: str = "within_run"
    busy_threads: int | None = 1  # CPU: threads of a second session used while other batches run (null = off)
    warmup_runs: int = 3  # first runs allocate and tune: keep them off the line's clock
    max_image_bytes: int = ImageLimits.max_bytes
    max_image_side: int = ImageLimits.max_side
    min_image_side: int = ImageLimits.min_side
    max_image_pixels: int = ImageLimits.max_pixels
    http: HttpConfig = field(default_factory=HttpConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    opcua: OpcUaConfig = field(default_factory=OpcUaConfig)
    swap: SwapConfig = field(default_factory=SwapConfig)
    # SIGTERM: hold new parts (503 + stored review) and report /readyz 503 this long while in-flight parts finish,
    # so clients on open connections get a decision instead of a reset and balancers move away; then exit
    drain_s: float = 1.0
    drift_enabled: bool = True  # watch brightness/contrast/score/verdict mix against the model's reference
    drift: DriftConfig = field(default_factory=DriftConfig)

    def validate(self) -> None:
        if not self.station or "/" in self.station or "+" in self.station or "#" in self.station:
            raise ConfigError(f"station {self.station!r} must be non-empty and contain no '/', '+' or '#'")
        if self.batching.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size must be ≥ 1, got {self.batching.max_batch_size}")
        if self.busy_threads is not None and self.busy_threads < 1:
            raise ConfigError(f"busy_threads must be ≥ 1 or null, got {self.busy_threads}")
        if self.spinning not in SPINNING:
            raise ConfigError(f"spinning: got {self.spinning!r}, allowed {', '.join(SPINNING)}")
        if self.batching.workers < 1:
            raise ConfigError(f"batching.workers must be ≥ 1, got {self.batching.workers}")
        if self.drain_s < 0:
            raise ConfigError(f"drain_s must be ≥ 0 (0: no drain), got {self.drain_s}")
        if self.batching.max_wait_ms < 0 or self.batching.timeout_s <= 0:
            raise ConfigError("batching.max_wait_ms must be ≥ 0 and batching.timeout_s > 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be ≥ 1 or null, got {self.threads}")
        if self.mqtt.qos not in (0, 1, 2):
            raise ConfigError(f"mqtt.qos must be 0, 1 or 2, got {self.mqtt.qos}")
        if self.mqtt.outbox_batch < 1 or self.mqtt.outbox_max_rows < 1 or self.mqtt.outbox_poll_s <= 0:
            raise ConfigError("mqtt.outbox_batch and mqtt.outbox_max_rows must be ≥ 1, mqtt.outbox_poll_s > 0")
        self._validate_opcua()
        self._validate_products()
        unknown = [p for p in self.providers if not p.endswith("ExecutionProvider")]
        if unknown:
            raise ConfigError(f"providers {unknown} are not onnxruntime provider names (e.g. CPUExecutionProvider)")

    def _validate_opcua(self) -> None:
        for station in self.opcua.stations:
            if not station or any(c in station for c in "/+#") or not station.isprintable():
                raise ConfigError(f"opcua.stations: {station!r} must be non-empty and contain no '/', '+' or '#'")
        if self.opcua.cert_days < 1 or self.opcua.state_poll_s <= 0:
            raise ConfigError("opcua.cert_days must be ≥ 1 and opcua.state_poll_s > 0")
        ep = self.opcua.endpoint
        if ep is not None:
            host, _, port = ep.removeprefix("opc.tcp://").partition("/")[0].rpartition(":")
            if not ep.startswith("opc.tcp://") or not host or not port.isdigit():
                raise ConfigError(f"opcua.endpoint {ep!r} must look like opc.tcp://HOST:PORT (opc.tcp://0.0.0.0:4840)")

    def _validate_products(self) -> None:
        from inspection.errors import RegistryError
        from inspection.registry import check_product

        try:
            for name in (*self.products, *self.station_products.values(), *([self.product] if self.product else [])):
                check_product(name)
        except RegistryError as exc:
            raise ConfigError(f"runner products: {exc}") from None
        if len(set(self.products)) != len(self.products):
            raise ConfigError(f"products {list(self.products)} names a product twice")
        served = self.served_products
        if not served:
            raise ConfigError("no product to serve: set product (e.g. default) or list products")
        if self.product is not None and self.product not in served:
            raise ConfigError(f"product {self.product!r} (for requests that name none) is not in products {served}")
        for station in self.station_products:
            if not station or any(c in station for c in "/+#"):
                raise ConfigError(f"station_products: station {station!r} must be non-empty, without '/', '+', '#'")
        stray = {s: p for s, p in self.station_products.items() if p not in served}
        if stray:
            raise ConfigError(f"station_products {stray}: not in the products served ({', '.join(served)})")

    @property
    def served_products(self) -> tuple[str, ...]:
        """The products this runner serves, each with its own model slot."""
        return self.products or ((self.product,) if self.product else ())

    def product_for_station(self, station: str) -> str | None:
        """The product of a part from `station` that names none: the station's own, else `product`."""
        return self.station_products.get(station, self.product)

    @property
    def opcua_stations(self) -> tuple[str, ...]:
        return self.opcua.stations or (self.station,)

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            min_side=self.min_image_side,
            max_side=self.max_image_side,
            max_pixels=self.max_image_pixels,
            max_bytes=self.max_image_bytes,
        )

    def resolved_token(self) -> str | None:
        return os.environ.get(TOKEN_ENV) or self.auth.token
