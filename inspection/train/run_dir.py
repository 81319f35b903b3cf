"""The run directory contract (docs/CONTRACTS.md): what training writes, and `load_run` to read it back."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inspection.config import load_config, save_config
from inspection.errors import DataError
from inspection.models import InspectionNet
from inspection.models.backbone import create_backbone
from inspection.preprocess import PreprocessConfig
from inspection.schemas import ModelCard
from inspection.train.config import TrainConfig
from inspection.train.data import make_sample

logger = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "checkpoint.pt", "model_card.json", "samples.json")
TRAINING_SET_FILE = "training_set.json"  # the same name as inspection.registry.TRAINING_SET_FILE


@dataclass
class LoadedRun:
    run_dir: Path
    net: InspectionNet  # eval mode, CPU
    card: ModelCard
    config: TrainConfig
    samples: dict[str, list[Any]]  # split -> list[Sample]
    checkpoint: dict[str, Any] = field(default_factory=dict)  # the metadata of checkpoint.pt (no weights)
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json


def checkpoint_payload(net: InspectionNet, config: TrainConfig, epoch: int) -> dict[str, Any]:
    return {
        "model_state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "backbone": config.backbone,
        "input_size": net.preprocess.config.input_size,
        "preprocess": net.preprocess.config.to_dict(),
        "dropout": float(net.dropout.p),
        "mode": config.mode,
        "epoch": int(epoch),
        "num_features": int(net.head.in_features),
        "taps": list(net.taps),
        "type_names": list(net.type_names),
        "pooling": net.pooling,
        "pool_temperature": net.temperature,
    }


def write_run(
    out: Path,
    net: InspectionNet,
    config: TrainConfig,
    card: ModelCard,
    splits: dict[str, list[Any]],
    extra: dict[str, Any],
    epoch: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    torch.save(checkpoint_payload(net, config, epoch), out / "checkpoint.pt")
    (out / "model_card.json").write_text(card.model_dump_json(indent=2))
    metrics = {k: m.model_dump() for k, m in card.metrics.items()}
    metrics.update({"thresholds": card.thresholds.model_dump(), "calibration": card.calibration, **extra})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    samples = {
        split: [
            {"sha256": s.sha256, "path": str(s.path), "label": s.label, "group_id": s.group_id, "split": split}
            for s in items
        ]
        for split, items in splits.items()
    }
    (out / "samples.json").write_text(json.dumps(samples, indent=1))
    # every photo and part that shaped the model (trained on or calibrated on): the registry's gate refuses a
    # version whose training set touches the golden set
    seen = [s for split in ("train", "val") for s in splits.get(split, [])]
    training_set = {"sha256": sorted({s.sha256 for s in seen}), "group_id": sorted({s.group_id for s in seen})}
    (out / TRAINING_SET_FILE).write_text(json.dumps(training_set))


def net_from_checkpoint(ckpt: dict[str, Any]) -> InspectionNet:
    """Rebuild the network from checkpoint.pt without any weights download or pretrained file."""
    body = create_backbone(ckpt["backbone"], pretrained=False)
    preprocess = PreprocessConfig.from_dict(ckpt["preprocess"])
    taps = tuple(ckpt.get("taps", ()))  # runs written before taps existed read the last features only
    net = InspectionNet(
        body,
        int(body.num_features),
        preprocess,
        dropout=float(ckpt.get("dropout", 0.2)),
        taps=taps,
        type_names=tuple(ckpt.get("type_names", ())),
        pooling=str(ckpt.get("pooling", "mean")),  # runs from before the multiple-instance head averaged
        temperature=float(ckpt.get("pool_temperature", 1.0)),
    )
    net.load_state_dict(ckpt["model_state"], strict=True)
    return net.eval()


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a run directory back: network (eval, CPU), model card, resolved config and the samples used."""
    run_dir = Path(run_dir)
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise DataError(f"{run_dir} is not a complete run directory: missing {', '.join(missing)}")
    config = load_config(TrainConfig, run_dir / "config.yaml")
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    net = net_from_checkpoint(ckpt)
    card = ModelCard.model_validate_json((run_dir / "model_card.json").read_text())
    raw = json.loads((run_dir / "samples.json").read_text())
    samples = {
        split: [
            make_sample(r["path"], r["sha256"], r.get("label"), r.get("split", split), r.get("group_id") or r["sha256"])
            for r in items
        ]
        for split, items in raw.items()
    }
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    meta = {k: v for k, v in ckpt.items() if k != "model_state"}
    return LoadedRun(run_dir, net, card, config, samples, meta, metrics)
