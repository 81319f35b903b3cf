"""Pydantic contracts for everything that crosses a process boundary.

`inspection schemas export` writes `data_schemas/*.json` from these models; a test fails when the committed
files are stale. Inside a process, stages pass plain dataclasses; these models are for files, HTTP and MQTT.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class Label(StrEnum):
    ok = "ok"
    defect = "defect"


class Split(StrEnum):
    train = "train"
    val = "val"
    test = "test"


class Verdict(StrEnum):
    # pass: ship it; review: a human looks before it moves on; reject: scrap/rework
    pass_ = "pass"
    review = "review"
    reject = "reject"


class RecordStatus(StrEnum):
    accepted = "accepted"
    duplicate = "duplicate"
    quarantined = "quarantined"


# a defect type's name (folder label maps 'defect:<type>', model cards, QA decisions): a slug that fits the decision
# store's String(32) columns and works as a folder name
DEFECT_TYPE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManifestRecord(_Contract):
    """One source file seen by ingest (accepted, an exact duplicate of an accepted one, or quarantined)."""

    source_path: str = Field(description="Path of the file as found in the drop folder")
    status: RecordStatus
    sha256: str | None = Field(None, description="sha256 of the file bytes; None only when unreadable")
    stored_path: str | None = Field(None, description="Content-addressed copy in the store (accepted only)")
    label: Label | None = Field(None, description="From the folder mapping or a QA review; None = unlabelled")
    label_source: str | None = Field(None, description="'folder', 'review' or None")
    defect_type: str | None = Field(
        None,
        max_length=32,
        pattern=DEFECT_TYPE_PATTERN,
        description="Defect type of a defect label (folder label_map 'defect:<type>' or a QA review); None = untyped",
    )
    width: int | None = None
    height: int | None = None
    channels_in: int | None = Field(None, description="Channels of the file before normalisation to RGB")
    bit_depth_in: int | None = Field(None, description="Bits per channel of the file before normalisation to 8")
    format: str | None = Field(None, description="jpeg, png, bmp or tiff, from the magic bytes")
    group_id: str | None = Field(None, description="Near-duplicate group (rotation/flip invariant)")
    split: Split | None = None
    quarantine_reason: str | None = Field(None, description="Reason code when quarantined (see images.REASONS)")
    quarantine_detail: str | None = None
    duplicate_of: str | None = Field(None, description="sha256 of the accepted record this file duplicates")
    ingested_at: datetime


class Thresholds(_Contract):
    """score >= reject -> reject; review <= score < reject -> review; score < review -> pass."""

    reject: float = Field(ge=0.0, le=1.0)
    review: float = Field(ge=0.0, le=1.0)


class InspectionResult(_Contract):
    """The answer to the line for one part (HTTP response body, MQTT payload, folder-mode JSON line)."""

    request_id: str
    part_id: str
    station: str
    timestamp: datetime
    verdict: Verdict
    defect_score: float | None = Field(
        None, ge=0.0, le=1.0, description="Model probability of a defect; None if no model verdict"
    )
    thresholds: Thresholds | None = None
    model_version: str | None = None
    latency_ms: float = Field(ge=0.0, description="From request received to answer ready")
    reason: str | None = Field(
        None, description="Why the part is held without a model verdict (bad image, model error)"
    )
    image_sha256: str | None = None
    product: str | None = Field(
        None, description="Product (part type) whose model judged the part, or the product the request named"
    )
    defect_type: str | None = Field(
        None,
        max_length=32,
        pattern=DEFECT_TYPE_PATTERN,
        description="Most likely defect type of a flagged (review/reject) part, where the model learned types "
        "(card.defect_types); None for a pass, a held part or a model without types",
    )
    defect_type_probability: float | None = Field(
        None, ge=0.0, le=1.0, description="The model's probability of `defect_type` among the types, given a defect"
    )


class DefectType(StrEnum):
    blowhole = "blowhole"
    crack = "crack"
    burr_flash = "burr_flash"
    shrinkage = "shrinkage"
    other = "other"


class ReviewAction(StrEnum):
    confirm_defect = "confirm_defect"
    override_ok = "override_ok"
    # withdraws the decision named in `replaces` (append-only undo; the part returns to its state before it)
    undo = "undo"


class ReviewDecision(_Contract):
    """A QA engineer's decision on a flagged part; append-only, `replaces` points at the decision it supersedes."""

    decision_id: int | None = None
    request_id: str
    action: ReviewAction
    defect_type: DefectType | None = None
    comment: str | None = Field(None, max_length=2000)
    reviewer: str
    decided_at: datetime
    replaces: int | None = None


class Metrics(_Contract):
    n: int
    accuracy: float
    defect_recall: float
    escape_rate: float
    false_reject_rate: float
    precision: float
    f1: float
    roc_auc: float | None = None
    pr_auc: float | None = None
    confusion: list[list[int]] = Field(description="[[tn, fp], [fn, tp]] with defect as the positive class")


class ModelCard(_Contract):
    """Everything a registry, a runner and an auditor need to know about one model version."""

    version: str
    created_at: datetime
    backbone: str
    mode: str = Field(description="head, partial, full or adapted")
    class_names: list[str]
    preprocess: dict[str, Any]
    thresholds: Thresholds
    target_escape_rate: float
    calibration: dict[str, Any] = Field(
        default_factory=dict, description="escape and false-reject rates at the thresholds"
    )
    metrics: dict[str, Metrics] = Field(default_factory=dict, description="per split name")
    data_fingerprint: str = Field(description="sha256 over the sorted training image hashes and labels")
    n_train: int
    parent_version: str | None = None
    files: dict[str, str] = Field(default_factory=dict, description="file name -> sha256")
    notes: str | None = None
    validation: str | None = Field(
        None, description="how the thresholds were calibrated: 'crossfit, K folds by part' or 'split'"
    )
    part_metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="per split (oof, val, test): rates per photo and per physical part with 95 % intervals",
    )
    excluded: dict[str, Any] = Field(
        default_factory=dict, description="photos kept out of training: golden set, parts labelled both ways"
    )
    defect_types: list[str] = Field(
        default_factory=list,
        description="defect types the model answers (output defect_type_probs, in this order); empty: ok/defect only",
    )
    type_metrics: dict[str, Any] = Field(
        default_factory=dict, description="defect types: photos per type, out-of-fold accuracy, confusion"
    )
    product: str | None = Field(
        None,
        description="product (part type) the model was trained for; the registry refuses it under another "
        "product. None: any (the product it is registered for decides)",
    )


CONTRACTS: dict[str, type[BaseModel]] = {
    "manifest_record": ManifestRecord,
    "inspection_result": InspectionResult,
    "review_decision": ReviewDecision,
    "model_card": ModelCard,
}


def schema_texts() -> dict[str, str]:
    """File name -> JSON Schema text, deterministic so staleness can be checked byte for byte."""
    return {
        f"{name}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in CONTRACTS.items()
    }


def export_schemas(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_texts().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    logger.info("wrote %d schemas to %s", len(written), out)
    return written


def stale_schemas(out_dir: str | Path) -> list[str]:
    """Names of committed schema files that differ from (or are missing against) the models."""
    out = Path(out_dir)
    return [
        name for name, text in schema_texts().items() if not (out / name).is_file() or (out / name).read_text() != text
    ]
