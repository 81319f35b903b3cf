"""Model registry: immutable versions, the `production`/`previous` aliases, a promotion gate and a history log,
per product (part type): each product has its own aliases, golden set, gate limits and history.

Layout of a registry folder (no torch needed to read or change it, so the runner and the flows share it):

    ROOT/versions/<v>/      model file(s), model_card.json (files -> sha256), metrics, plots, SHA256SUMS,
                            registered.json (when, by whom, for which product); shared by every product
    HOME/registry.yaml      RegistryConfig: golden set, gate limits
    HOME/golden.json        the golden set frozen at `init`: [{"sha256", "path", "label", "group_id"}]: whole
                            parts sampled from a store (never trained on, never used for calibration)
    HOME/aliases.json       {"production": v, "previous": v}; replaced atomically (write, fsync, rename)
    HOME/history.jsonl      one JSON line per change: who, when, what, why, the gate's figures
    HOME/gate_cache/        golden-set figures per version (a version is immutable, so they never go stale)

HOME is ROOT itself for the product "default" (so a registry folder made before products existed is the product
"default", unchanged) and `ROOT/products/<product>/` for any other. A version belongs to the one product it was
registered for: another product's aliases can never point at it (a tile model never judges impellers).

Every change of aliases/history happens under an exclusive file lock, so concurrent promotions serialise and
leave a consistent registry. A version's files are checked against the sha256 in its card whenever it is loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from inspection.config import from_dict, load_config, save_config
from inspection.errors import ConfigError, DataError, IntegrityError, RegistryError
from inspection.schemas import ModelCard

logger = logging.getLogger(__name__)

CONFIG_NAME = "registry.yaml"
TRAINING_SET_FILE = "training_set.json"  # written by training, shipped by export: what a version has seen
ALIASES = ("production", "previous")
DEFAULT_PRODUCT = "default"  # the product of a registry folder made before products existed: HOME is ROOT
PRODUCTS_DIR = "products"
# product names become folder names, metric labels and MQTT payload fields: keep them plain
_PRODUCT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_product(product: str | None) -> str:
    """The product name (None -> "default"), or RegistryError saying what is allowed."""
    if product is None:
        return DEFAULT_PRODUCT
    if not isinstance(product, str) or not _PRODUCT_RE.match(product):
        raise RegistryError(
            f"product {product!r}: allowed are 1-64 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return product


def product_home(root: str | Path, product: str | None = None) -> Path:
    """The folder holding a product's aliases, golden set, gate config and history."""
    product = check_product(product)
    root = Path(root)
    return root if product == DEFAULT_PRODUCT else root / PRODUCTS_DIR / product


def list_products(root: str | Path) -> list[str]:
    """Products a registry folder knows: "default" when its root holds a product's files or versions, then the
    folders under ROOT/products/."""
    root = Path(root)
    found = []
    own = any((root / name).exists() for name in (CONFIG_NAME, "aliases.json", "golden.json", "history.jsonl"))
    if own or any(_version_product(d) == DEFAULT_PRODUCT for d in _version_dirs(root)):
        found.append(DEFAULT_PRODUCT)
    base = root / PRODUCTS_DIR
    if base.is_dir():
        found += sorted(d.name for d in base.iterdir() if d.is_dir() and _PRODUCT_RE.match(d.name))
    return found


def _version_dirs(root: Path) -> list[Path]:
    base = root / "versions"
    if not base.is_dir():
        return []
    return [d for d in base.iterdir() if d.is_dir() and (d / "registered.json").is_file()]


def _registered(version_dir: Path) -> dict[str, Any]:
    return json.loads((version_dir / "registered.json").read_text())


def _version_product(version_dir: Path) -> str:
    # versions registered before products existed carry no product: they are the default product's
    return _registered(version_dir).get("product") or DEFAULT_PRODUCT


@dataclass(frozen=True)
class RegistryConfig:
    golden_set: str | None = None  # store / manifest (whole parts sampled from it) or a def_front/ok_front folder
    golden_parts: float = 0.15  # share of each label's parts frozen as the golden set (a store's parts)
    golden_seed: int = 0  # which parts: a seeded hash order, stable when the store grows
    golden_split: str | None = None  # instead of sampling parts: take a store split as it is (e.g. test)
    max_escape_rate: float = 0.01  # first promotion (no production yet): at most this share of defects passed
    max_false_reject_rate: float = 0.25  # first promotion: at most this share of good parts rejected
    escape_tolerance: float = 0.0  # a candidate may not let more defects pass than production: escapes cost most
    false_reject_margin: float = 0.02  # it may scrap this much more of the good parts than production
    model_file: str = "model.onnx"  # what the gate evaluates (the FP32 reference)
    threads: int | None = None  # onnxruntime threads for the gate's evaluation; None = all cores

    def validate(self) -> None:
        if not 0.0 < self.golden_parts < 1.0:
            raise ConfigError(f"registry.golden_parts: got {self.golden_parts}, allowed 0 < x < 1 (a share of parts)")
        for name in ("max_escape_rate", "max_false_reject_rate", "escape_tolerance", "false_reject_margin"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"registry.{name}: got {value}, allowed 0..1 (a rate)")


@dataclass(frozen=True)
class ModelVersion:
    version: str
    dir: Path
    card: ModelCard
    model_path: Path


@dataclass(frozen=True)
class GoldenFigures:
    n: int  # photos
    n_defect: int
    escape_rate: float  # defective photos answered `pass`
    false_reject_rate: float  # good photos answered `reject`
    review_rate: float  # photos held for a human
    accuracy: float  # pass = ok, reject/review = defect
    n_parts: int = 0
    n_defect_parts: int = 0
    # rate -> {"photo": {value, low, high, ...}, "part": ..., "part_mostly": ...}: 95 % intervals (inspection.stats)
    intervals: dict[str, Any] = field(default_factory=dict)

    def describe(self, name: str) -> str:
        """'1.20 % [0.00, 4.10] of photos, 0/6 parts mostly' for the gate's reason."""
        r = self.intervals.get(name)
        if not r:
            return f"{100 * getattr(self, name):.2f} %"
        ph, mostly = r["photo"], r["part_mostly"]
        return (
            f"{100 * ph['value']:.2f} % [{100 * ph['low']:.2f}, {100 * ph['high']:.2f}] of photos, "
            f"{int(mostly['k'])}/{mostly['n']} parts mostly [{100 * mostly['low']:.0f}, {100 * mostly['high']:.0f} %]"
        )


@dataclass
class GateReport:
    version: str
    production: str | None
    promoted: bool
    forced: bool
    reason: str
    candidate: dict[str, Any] | None = None
    production_figures: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # candidate vs production, for humans

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Registry:
    """One product of a registry folder (default: "default", whose files sit in the root). Cheap to construct:
    every method reads the files it needs."""

    def __init__(self, root: str | Path, config: RegistryConfig | None = None, product: str | None = None):
        self.root = Path(root)
        self.product = check_product(product)
        self.home = product_home(self.root, self.product)
        cfg_path = self.home / CONFIG_NAME
        self.config = config or (load_config(RegistryConfig, cfg_path) if cfg_path.is_file() else RegistryConfig())

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r}, product={self.product!r})"

    # ------------------------------------------------------------------------------------------- set-up
    @classmethod
    def init(cls, root: str | Path, config: RegistryConfig, product: str | None = None) -> Registry:
        """Create (or re-configure) a product of a registry and freeze its golden set from `config.golden_set`."""
        root = Path(root)
        home = product_home(root, product)
        (root / "versions").mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        save_config(config, home / CONFIG_NAME)
        reg = cls(root, config, product)
        if config.golden_set:
            golden = _collect_golden(Path(config.golden_set), config)
            _atomic_write(home / "golden.json", json.dumps(golden, indent=1) + "\n")
            parts = {(i["group_id"], i["label"]) for i in golden}
            logger.info(
                "registry %s, product %s: golden set of %d photos of %d parts (%d good) frozen from %s",
                root,
                reg.product,
                len(golden),
                len(parts),
                sum(1 for _, label in parts if label == "ok"),
                config.golden_set,
            )
        return reg

    @contextlib.contextmanager
    def _locked(self, folder: Path | None = None) -> Iterator[None]:
        """Exclusive lock of a product's aliases and history (HOME), or of the shared versions (ROOT)."""
        folder = self.home if folder is None else folder
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------------------------------- versions
    def versions(self) -> list[str]:
        """This product's registered versions, oldest first."""
        found = []
        for d in _version_dirs(self.root):
            meta = _registered(d)
            if (meta.get("product") or DEFAULT_PRODUCT) == self.product:
                found.append((meta["registered_at"], d.name))
        return [name for _, name in sorted(found)]

    def register(self, export_dir: str | Path, user: str | None = None) -> str:
        """Copy an export folder in as an immutable version named by its card; returns the version.

        Registering the same files again returns the existing version; a different model under a version name
        that exists is refused.
        """
        export_dir = Path(export_dir)
        card = _read_card(export_dir / "model_card.json")
        _verify_files(export_dir, card)
        version = card.version
        if not version or "/" in version or version.startswith("."):
            raise RegistryError(f"model card version {version!r} cannot name a registry version")
        if card.product is not None and card.product != self.product:
            raise RegistryError(
                f"version {version} was trained for product {card.product!r}, not {self.product!r}; register it "
                f"with --product {card.product}"
            )
        target = self.root / "versions" / version
        with self._locked(self.root):  # the versions folder is shared by every product
            if target.exists():
                existing = _read_card(target / "model_card.json")
                owner = _version_product(target)
                if existing.files == card.files and owner == self.product:
                    logger.info("version %s is already registered with the same files", version)
                    return version
                if existing.files == card.files:
                    raise RegistryError(f"version {version} is already registered for product {owner!r}; refusing")
                raise RegistryError(f"version {version} is already registered with different files; refusing")
            tmp = self.root / "versions" / f".{version}.incoming"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(export_dir, tmp)
            sums = "".join(f"{sha}  {name}\n" for name, sha in sorted(card.files.items()))
            (tmp / "SHA256SUMS").write_text(sums)
            when = datetime.now(UTC).isoformat()
            meta = {"registered_at": when, "by": user or _user(), "product": self.product}
            (tmp / "registered.json").write_text(json.dumps(meta))
            os.replace(tmp, target)
        with self._locked():
            self._append_history("register", version=version, user=user, reason=f"from {export_dir}")
        logger.info("registered %s for product %s", version, self.product)
        return version

    def get(self, version: str) -> ModelVersion:
        """A registered version, its files verified against the sha256 in its card (IntegrityError if not)."""
        d = self.root / "versions" / version
        if not version or "/" in version or not (d / "registered.json").is_file():
            raise RegistryError(
                f"unknown version {version!r} of product {self.product!r}; registered: "
                f"{', '.join(self.versions()) or 'none'}"
            )
        owner = _version_product(d)
        if owner != self.product:  # an alias of one product must never load another product's model
            raise RegistryError(f"version {version} belongs to product {owner!r}, not {self.product!r}")
        card = _read_card(d / "model_card.json")
        _verify_files(d, card)
        return ModelVersion(version=version, dir=d, card=card, model_path=d / self.config.model_file)

    # ------------------------------------------------------------------------------------------- aliases
    @property
    def aliases_path(self) -> Path:
        """The file a runner watches for this product's promotions."""
        return self.home / "aliases.json"

    def aliases(self) -> dict[str, str | None]:
        path = self.aliases_path
        data = json.loads(path.read_text()) if path.is_file() else {}
        return {name: data.get(name) for name in ALIASES}

    def alias(self, name: str = "production") -> str | None:
        if name not in ALIASES:
            raise RegistryError(f"unknown alias {name!r}; allowed: {', '.join(ALIASES)}")
        return self.aliases()[name]

    def history(self) -> list[dict[str, Any]]:
        path = self.home / "history.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _append_history(self, action: str, user: str | None = None, **fields: Any) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(),
            "user": user or _user(),
            "action": action,
            "product": self.product,
            **fields,
        }
        with open(self.home / "history.jsonl", "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _set_aliases(self, production: str | None, previous: str | None) -> None:
        _atomic_write(self.aliases_path, json.dumps({"production": production, "previous": previous}) + "\n")

    # ------------------------------------------------------------------------------------------- gate
    def golden_figures(self, version: str) -> GoldenFigures:
        """The version's verdicts on the frozen golden set (cached per version: versions are immutable)."""
        golden = self._golden()
        key = hashlib.sha256(json.dumps(golden, sort_keys=True).encode()).hexdigest()[:16]
        cache = self.home / "gate_cache" / f"{version}-{key}.json"
        if cache.is_file():
            return GoldenFigures(**json.loads(cache.read_text()))
        mv = self.get(version)
        figures = _evaluate_golden(mv, golden, self.config.threads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache, json.dumps(asdict(figures)))
        return figures

    def _golden(self) -> list[dict[str, str]]:
        path = self.home / "golden.json"
        if not path.is_file():
            flag = "" if self.product == DEFAULT_PRODUCT else f" --product {self.product}"
            raise RegistryError(
                f"registry {self.root} has no golden set for product {self.product!r}; run `inspection registry "
                f"--root {self.root}{flag} init --golden-set PATH` first"
            )
        return json.loads(path.read_text())

    def golden_overlap(self, version: str) -> str | None:
        """'N photos of M parts' of the golden set that `version` was trained on (from its training_set.json),
        or None. A version exported without that file (older releases) cannot be checked and passes."""
        mv = self.get(version)
        path = mv.dir / TRAINING_SET_FILE
        if not path.is_file():
            logger.warning("%s has no %s: cannot check that it never saw the golden set", version, TRAINING_SET_FILE)
            return None
        trained = json.loads(path.read_text())
        shas, groups = set(trained.get("sha256", [])), set(trained.get("group_id", []))
        hit = [i for i in self._golden() if i["sha256"] in shas or (i.get("group_id") and i["group_id"] in groups)]
        if not hit:
            return None
        return f"{len(hit)} photos of {len({i.get('group_id') or i['sha256'] for i in hit})} parts"

    def gate(self, version: str) -> GateReport:
        """Would `version` be promoted? Compares it with production on the golden set; changes nothing."""
        production = self.alias("production")
        cfg = self.config
        seen = self.golden_overlap(version)
        if seen:
            return GateReport(
                version=version,
                production=production,
                promoted=False,
                forced=False,
                reason=f"refused: {version} was trained on {seen} of the golden set; its golden figures mean "
                "nothing (train with exclude: REGISTRY so the golden parts stay out)",
            )
        cand = self.golden_figures(version)
        stated = (
            f" (golden set: {cand.n} photos of {cand.n_parts} parts; escape rate {cand.describe('escape_rate')}; "
            f"false-reject rate {cand.describe('false_reject_rate')})"
        )
        if production is None:
            ok = cand.escape_rate <= cfg.max_escape_rate and cand.false_reject_rate <= cfg.max_false_reject_rate
            reason = (
                f"first model: escape rate {cand.escape_rate:.4f} (limit {cfg.max_escape_rate}), false-reject rate "
                f"{cand.false_reject_rate:.4f} (limit {cfg.max_false_reject_rate})" + stated
            )
            prod = None
        else:
            prod = self.golden_figures(production)
            escape_ok = cand.escape_rate <= prod.escape_rate + cfg.escape_tolerance
            frr_ok = cand.false_reject_rate <= prod.false_reject_rate + cfg.false_reject_margin
            ok = escape_ok and frr_ok
            reason = (
                f"escape rate {cand.escape_rate:.4f} vs production {prod.escape_rate:.4f} "
                f"({'ok' if escape_ok else 'worse'}); false-reject rate {cand.false_reject_rate:.4f} vs "
                f"{prod.false_reject_rate:.4f} + margin {cfg.false_reject_margin} ({'ok' if frr_ok else 'worse'})"
                + stated
            )
        rows = [{"model": f"candidate {version}", **_row(cand)}]
        if prod is not None:
            rows.append({"model": f"production {production}", **_row(prod)})
        return GateReport(
            version=version,
            production=production,
            promoted=ok,
            forced=False,
            reason=("passes: " if ok else "refused: ") + reason,
            candidate=asdict(cand),
            production_figures=asdict(prod) if prod else None,
            rows=rows,
        )

    def promote(self, version: str, reason: str = "", user: str | None = None, force: bool = False) -> GateReport:
        """Make `version` production if it passes the gate (or `force` with a reason); previous <- production."""
        self.get(version)  # exists and is intact
        if force and not reason.strip():
            raise RegistryError("--force needs --reason TEXT: an override must say why")
        with self._locked():
            current = self.alias("production")
            if current == version:
                return GateReport(version, current, False, False, f"{version} is already production")
            try:
                report = self.gate(version)
            except RegistryError:
                if not force:
                    raise
                report = GateReport(version, current, False, False, "no golden set to gate on")
            if not report.promoted and not force:
                self._append_history("refused", user=user, version=version, reason=reason, gate=report.reason)
                logger.warning("product %s: gate refused %s: %s", self.product, version, report.reason)
                return report
            report.forced = force and not report.promoted
            report.promoted = True
            self._set_aliases(version, current)
            self._append_history(
                "promote",
                user=user,
                version=version,
                **{"from": current},
                reason=reason,
                forced=report.forced,
                gate=report.reason,
            )
        logger.info(
            "product %s: promoted %s (was %s)%s", self.product, version, current, " FORCED" if report.forced else ""
        )
        return report

    def rollback(self, reason: str = "", user: str | None = None) -> str:
        """production <- previous, previous <- the version rolled back from; returns the new production."""
        with self._locked():
            aliases = self.aliases()
            previous, current = aliases["previous"], aliases["production"]
            if previous is None:
                raise RegistryError(f"nothing to roll back to: product {self.product!r} has no `previous` version")
            self.get(previous)  # refuse to roll back onto a damaged version
            self._set_aliases(previous, current)
            self._append_history("rollback", user=user, version=previous, **{"from": current}, reason=reason)
        logger.info("product %s: rolled back %s -> %s", self.product, current, previous)
        return previous


# ----------------------------------------------------------------------------------------------- helpers
def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def _read_card(path: Path) -> ModelCard:
    if not path.is_file():
        raise RegistryError(f"no model card at {path}")
    try:
        return ModelCard.model_validate_json(path.read_text())
    except ValueError as exc:
        raise RegistryError(f"model card {path} is invalid: {exc}") from None


def _verify_files(folder: Path, card: ModelCard) -> None:
    if not card.files:
        raise IntegrityError(f"model card in {folder} lists no files with their sha256")
    for name, expected in card.files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is listed in the model card but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(f"{path}: sha256 {actual[:16]}… does not match the model card's {expected[:16]}…")


def _collect_golden(source: Path, config: RegistryConfig) -> list[dict[str, str]]:
    """Labelled golden photos from a store/manifest (whole parts sampled per label, or one split) or a
    def_front/ok_front folder (every photo, each its own part)."""
    from inspection.ingest import IngestConfig, load_samples, mixed_label_groups

    if source.is_file() or (source / "manifest.sqlite").is_file():
        samples = [s for s in load_samples(source) if s.label in ("ok", "defect")]
        mixed = mixed_label_groups(samples)  # a part labelled both ways cannot judge a model
        samples = [s for s in samples if s.group_id not in mixed]
        if config.golden_split:
            chosen = [s for s in samples if s.split == config.golden_split]
        else:
            picked = _sample_parts(samples, config.golden_parts, config.golden_seed)
            chosen = [s for s in samples if s.group_id in picked]
        items = [{"sha256": s.sha256, "path": str(s.path), "label": s.label, "group_id": s.group_id} for s in chosen]
    elif source.is_dir():
        mapping = IngestConfig().label_map
        items = []
        for folder, label in mapping.items():
            for p in sorted((source / folder).glob("*")) if (source / folder).is_dir() else []:
                if p.is_file():
                    sha = sha256_file(p)
                    items.append({"sha256": sha, "path": str(p.resolve()), "label": label, "group_id": sha})
    else:
        raise DataError(f"golden set {source} is neither a store, a manifest nor a folder of images")
    if not any(i["label"] == "defect" for i in items) or not any(i["label"] == "ok" for i in items):
        raise DataError(f"golden set {source} needs both defect and ok parts; found {len(items)} photos")
    return items


def _sample_parts(samples: list[Any], share: float, seed: int) -> set[str]:
    """`share` of each label's parts (at least one), in a seeded hash order of the group ids."""
    by_label: dict[str, set[str]] = {}
    for s in samples:
        by_label.setdefault(s.label, set()).add(s.group_id)
    picked: set[str] = set()
    for groups in by_label.values():
        order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        picked.update(order[: max(1, round(share * len(order)))])
    return picked


def _row(figures: GoldenFigures) -> dict[str, Any]:
    """The gate table's row: the point figures plus each rate's per-photo interval and parts mostly misjudged."""
    row = {k: v for k, v in asdict(figures).items() if k != "intervals"}
    for name in ("escape_rate", "false_reject_rate"):
        if name in figures.intervals:
            row[f"{name} (95 % interval)"] = figures.describe(name)
    return row


def _evaluate_golden(mv: ModelVersion, golden: list[dict[str, str]], threads: int | None) -> GoldenFigures:
    from inspection.images import read_image
    from inspection.onnx_infer import OnnxModel
    from inspection.schemas import Thresholds
    from inspection.thresholds import verdicts_for

    model = OnnxModel(mv.model_path, threads=threads, expected_sha256=mv.card.files.get(mv.model_path.name))
    images = []
    for item in golden:
        path = Path(item["path"])
        if not path.is_file():
            raise DataError(f"golden part {path} is missing; the golden set must stay where it was frozen")
        images.append(read_image(path))
    scores, _ = model.predict_images(images)
    verdicts = verdicts_for(np.asarray(scores), Thresholds.model_validate(mv.card.thresholds.model_dump()))
    from inspection.stats import part_rates

    labels = np.array([i["label"] for i in golden])
    groups = np.array([i.get("group_id") or i["sha256"] for i in golden])
    defect, ok = labels == "defect", labels == "ok"
    hits = {
        "escape_rate": (verdicts == "pass", defect),
        "false_reject_rate": (verdicts == "reject", ok),
        "review_rate": (verdicts == "review", np.ones_like(ok)),
    }
    intervals = {
        name: {k: r.to_dict() for k, r in part_rates(h[where], groups[where]).items()}
        for name, (h, where) in hits.items()
        if where.any()
    }
    return GoldenFigures(
        n=len(golden),
        n_defect=int(defect.sum()),
        escape_rate=float((verdicts[defect] == "pass").mean()),
        false_reject_rate=float((verdicts[ok] == "reject").mean()),
        review_rate=float((verdicts == "review").mean()),
        accuracy=float(((verdicts == "pass") == ok).mean()),
        n_parts=int(len(set(groups.tolist()))),
        n_defect_parts=int(len(set(groups[defect].tolist()))),
        intervals=intervals,
    )


def config_from_mapping(data: dict[str, Any]) -> RegistryConfig:
    return from_dict(RegistryConfig, data)
