"""The training stage: fine-tune the pretrained CNN (head | partial | full), calibrate, report per photo and part.

By default the model is cross-fitted (inspection.train.crossfit): every labelled part is scored once by a fold
model that never saw it, the out-of-fold logits are Platt-scaled so a score is a probability, the thresholds are
calibrated on all of them, and the production model is fitted on every labelled part except the registry's golden
set and any part whose photos carry both labels. `validation: split` keeps the store's train/val/test split.
The modes and the loop: inspection.train.loop; the frozen pass: inspection.train.frozen.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspection.config import save_config
from inspection.errors import ConfigError, DataError
from inspection.models import CLASS_NAMES, InspectionNet
from inspection.schemas import Metrics, ModelCard, Thresholds
from inspection.train.calibrate import calibrate_threshold, calibration_report
from inspection.train.config import TrainConfig
from inspection.train.data import (
    LABEL_TO_TARGET,
    data_fingerprint,
    loader_size,
    resolve_samples,
    split_samples,
    targets_of,
)
from inspection.train.evaluate import evaluate_scores, line_report, part_report
from inspection.train.fitting import Fitted, fit_crossfit, fit_split
from inspection.train.frozen import (  # noqa: F401 - re-exported: the stage's public helpers
    FeatureCache,
    extract,
    split_point,
    tail_logits,
    trunk_activations,
    weights_tag,
)
from inspection.train.linear import Platt, calibration_error, fit_platt
from inspection.train.loop import (  # noqa: F401 - re-exported
    amp_context,
    apply_freeze,
    build_net_for,
    fit,
    param_groups,
    predict_logits,
    predict_scores,
    seed_everything,
    select_device,
    set_train_mode,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    card: ModelCard
    metrics: dict[str, Metrics]
    best_epoch: int
    epochs_run: int
    train_seconds: float  # wall time of the fit (folds and final fit), feature extraction included
    images_per_second: float  # images (augmented views included) through the network per second
    history: list[dict[str, Any]] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)  # split -> per-photo / per-part rates with intervals
    excluded: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- the pool
def golden_exclusions(path: str | Path) -> tuple[set[str], set[str]]:
    """(sha256s, group ids) of a registry's golden set: a registry folder or its golden.json."""
    path = Path(path)
    file = path / "golden.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"exclude: {path} is neither a registry folder with golden.json nor a golden.json file")
    try:
        items = json.loads(file.read_text())
    except ValueError as exc:
        raise ConfigError(f"exclude: {file} is not valid JSON ({exc})") from None
    return {i["sha256"] for i in items if i.get("sha256")}, {i["group_id"] for i in items if i.get("group_id")}


def select_pool(samples: Sequence[Any], config: TrainConfig) -> tuple[list[Any], dict[str, Any]]:
    """The labelled samples training may use, and what was kept out and why.

    Kept out: unlabelled photos; the golden set named by `config.exclude` (by photo and by part, so another
    photo of a golden part is held out too); parts whose photos carry both labels (ambiguous until QA
    settles them in the review app; relabelled parts come back on the next run).
    """
    from inspection.ingest.manifest import mixed_label_groups

    for s in samples:
        if s.label is not None and s.label not in LABEL_TO_TARGET:
            raise DataError(f"sample {s.path}: label {s.label!r}, allowed: {', '.join(LABEL_TO_TARGET)}")
    labelled = [s for s in samples if s.label is not None]
    golden_sha: set[str] = set()
    golden_groups: set[str] = set()
    if config.exclude:
        golden_sha, golden_groups = golden_exclusions(config.exclude)
    golden = [s for s in labelled if s.sha256 in golden_sha or s.group_id in golden_groups]
    rest = [s for s in labelled if not (s.sha256 in golden_sha or s.group_id in golden_groups)]
    mixed = mixed_label_groups(rest)
    pool = [s for s in rest if s.group_id not in mixed]
    mixed_counts: dict[str, dict[str, int]] = {}
    for s in rest:
        if s.group_id in mixed:
            mixed_counts.setdefault(s.group_id, {"ok": 0, "defect": 0})[s.label] += 1
    excluded = {
        "unlabelled": len(samples) - len(labelled),
        "golden_photos": len(golden),
        "golden_parts": len({s.group_id for s in golden}),
        "golden_source": str(config.exclude) if config.exclude else None,
        "mixed_label_parts": mixed_counts,
        "mixed_label_photos": len(rest) - len(pool),
    }
    if mixed:
        logger.warning(
            "%d parts carry both labels (%s): kept out of training, calibration and evaluation until QA settles "
            "them (review app: 'same part, labels disagree')",
            len(mixed),
            ", ".join(f"{g}: {c['ok']} ok + {c['defect']} defect" for g, c in sorted(mixed_counts.items())),
        )
    if golden:
        logger.info("golden set: %d photos of %d parts kept out", len(golden), excluded["golden_parts"])
    elif config.validation == "crossfit":
        logger.warning(
            "no golden set excluded (exclude: null): every labelled part is trained on, so a registry gate "
            "must use parts from elsewhere (the gate refuses a golden set this model has seen)"
        )
    return pool, excluded


# ---------------------------------------------------------------------------------------------- the stage
def _prepared_net(config: TrainConfig, device: torch.device) -> InspectionNet:
    """The pretrained network of `config` on `device`, frozen as its mode says."""
    net = build_net_for(config).to(device)
    if device.type == "cuda" and config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    apply_freeze(net, config)
    return net


def _check_grid_cache(config: TrainConfig, net: InspectionNet, photos: int) -> None:
    from inspection.train.mil import grid_cache_problem

    lse_head = config.mode == "head" and config.head_pooling == "lse"
    if lse_head and (why := grid_cache_problem(net, photos, config.max_cache_gb)):
        raise ConfigError(
            f"head_pooling lse caches every photo's grid features: {why}; use a smaller input_size, fewer taps, "
            "or head_pooling: mean"
        )


def run_train(config: TrainConfig, data: Path | str | Sequence[Any] | None, out: Path | str) -> TrainResult:
    """Train per `config` on `data` (store, manifest, image folder or a list of samples) into run directory `out`."""
    from inspection.train.plots import plot_history, write_eval_plots
    from inspection.train.run_dir import write_run

    config.validate()
    out = Path(out)
    if config.mode != "full" and not config.pretrained:
        logger.warning("mode %s freezes a randomly initialised backbone (pretrained=false)", config.mode)
    data = data if data is not None else config.data
    if data is None:
        raise ConfigError("no data: pass --data (store, manifest or image folder) or set `data:` in the config")
    existing = [name for name in ("checkpoint.pt", "last.pt") if (out / name).is_file()]
    if existing and not config.resume:
        raise ConfigError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume (resume=true) to continue it, "
            "or choose a new --out: a finished run is never overwritten"
        )
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    generator = seed_everything(config.seed)
    samples = resolve_samples(data, Path(config.work_dir) if config.work_dir else out / "store")
    pool, excluded = select_pool(samples, config)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    device = select_device(config)

    t_start = time.perf_counter()
    auto = None
    if config.mode == "auto":  # each candidate builds its own network; the winner's is the run's
        from inspection.train.auto import run_auto

        if not pool:
            raise DataError(f"no labelled photos to train on in {data} (after {excluded})")
        splits = {"train": pool, "val": [], "test": []}
        fitted, config, net, auto = run_auto(config, pool, device, out, generator)
        size_hw = loader_size(pool, net.preprocess.config)  # the winner's input (its size and resize)
        save_config(config, out / "config.yaml")  # the resolved recipe: what export and later runs read
    elif config.validation == "crossfit":
        if not pool:
            raise DataError(f"no labelled photos to train on in {data} (after {excluded})")
        splits = {"train": pool, "val": [], "test": []}
        net = _prepared_net(config, device)
        _check_grid_cache(config, net, len(pool))
        size_hw = loader_size(pool, net.preprocess.config)
        logger.info("data: %d photos (%d defect) of %d parts", len(pool), int(targets_of(pool).sum()), _n_parts(pool))
        fitted = fit_crossfit(net, config, pool, size_hw, device, out, generator)
    else:
        splits = split_samples(pool, config.max_per_class, config.seed)
        logger.info(
            "data: %s", ", ".join(f"{k} {len(v)} ({int(targets_of(v).sum())} defect)" for k, v in splits.items())
        )
        net = _prepared_net(config, device)
        _check_grid_cache(config, net, sum(len(v) for v in splits.values()))
        size_hw = loader_size([s for items in splits.values() for s in items], net.preprocess.config)
        fitted = fit_split(net, config, splits, size_hw, device, out, generator)
    fit_seconds = time.perf_counter() - t_start

    # scores that mean something: Platt-scale the calibration logits (out of fold when cross-fitted), fold the
    # scaling into the head so the exported model answers calibrated probabilities
    calib_targets = targets_of(fitted.calib_samples)
    platt = fit_platt(fitted.calib_logits, calib_targets) if config.calibration == "platt" else Platt()
    _fold_platt(net, platt)
    if fitted.rescore is not None:  # the scores the exported network will reproduce, float32 rounding included
        calib_logits, eval_logits = fitted.rescore()
        scores = {fitted.calib_name: _probs(calib_logits), **{k: _probs(v) for k, v in eval_logits.items()}}
    else:  # out of fold: the fold models' logits, scaled
        scores = {fitted.calib_name: platt(fitted.calib_logits)}
        scores.update({k: platt(v) for k, v in fitted.eval_logits.items()})
    samples_of = {fitted.calib_name: fitted.calib_samples, **fitted.eval_samples}
    labels = {k: [s.label for s in v] for k, v in samples_of.items()}
    calib = fitted.calib_name
    thresholds = calibrate_threshold(
        scores[calib],
        labels[calib],
        config.target_escape_rate,
        config.review_escape_rate,
        config.review_fraction,
        config.review_max_ok_rate,
    )
    types = None
    if config.defect_types and fitted.features is not None:
        from inspection.train.types import fit_types, typed_defects

        if len(typed_defects(fitted.calib_samples)[1]) >= 2:
            folds = fitted.crossfit.folds if fitted.crossfit else None
            types = fit_types(net, fitted.calib_samples, fitted.features(), folds, config)
    metrics = {k: evaluate_scores(scores[k], labels[k], thresholds) for k in scores if len(scores[k])}
    calibration = calibration_report(scores[calib], labels[calib], thresholds, config.target_escape_rate)
    calibration.update(
        {
            "split": calib,
            "scaling": config.calibration,
            "platt": platt.to_dict(),
            **calibration_error(scores[calib], calib_targets),
        }
    )
    parts = {
        k: part_report(scores[k], labels[k], [s.group_id for s in samples_of[k]], thresholds)
        for k in scores
        if len(scores[k])
    }
    fingerprint = data_fingerprint(splits["train"])
    created = datetime.now(UTC)
    validation = f"crossfit, {fitted.crossfit.k} folds by part" if fitted.crossfit else "split"
    if auto is not None:
        validation += f"; mode auto: {auto.why}"
    card = ModelCard(
        version=f"{created:%Y%m%dT%H%M%S}-{config.mode}-{fingerprint[:8]}",
        created_at=created,
        backbone=config.backbone,
        mode=config.mode,
        class_names=list(CLASS_NAMES),
        preprocess=net.preprocess.config.to_dict(),
        thresholds=thresholds,
        target_escape_rate=config.target_escape_rate,
        calibration=calibration,
        metrics=metrics,
        data_fingerprint=fingerprint,
        n_train=len(splits["train"]),
        files={},
        notes=_notes(config, fitted, validation),
        validation=validation,
        part_metrics=parts,
        excluded=excluded,
        defect_types=list(types["types"]) if types else [],
        type_metrics=types or {},
    )
    images_per_second = fitted.images_seen / max(fit_seconds, 1e-9)
    extra = {
        "best_epoch": fitted.state.best_epoch,
        "epochs_run": fitted.state.epoch,
        "train_seconds": fit_seconds,
        "frozen_seconds": fitted.frozen_seconds,
        "frozen_engine": fitted.frozen_engine,
        "images_per_second": images_per_second,
        "device": str(device),
        "line": {k: line_report(scores[k], labels[k], thresholds) for k in metrics},
        "parts": parts,
        "history": fitted.state.history,
        "size_hw": list(size_hw),
        "counts": {k: {"n": len(v), "defect": int(targets_of(v).sum()) if v else 0} for k, v in splits.items()},
        "excluded": excluded,
        "crossfit": fitted.crossfit.to_dict() if fitted.crossfit else None,
        "auto": auto.to_dict() if auto else None,
    }
    write_run(out, net, config, card, splits, extra, epoch=fitted.state.best_epoch)
    # raw scores in samples.json order: re-plot or re-threshold without the network
    for k, v in scores.items():
        np.save(out / f"{k}_scores.npy", np.asarray(v, dtype=np.float64))
    if fitted.crossfit is not None:
        np.save(out / "folds.npy", fitted.crossfit.folds)
    write_run_drift_reference(out, fitted.calib_samples, scores[calib], thresholds, card.version)
    if config.plots:
        plot_dir = out / "plots"
        main = "test" if "test" in scores and len(scores["test"]) else calib
        write_eval_plots(scores[main], labels[main], samples_of[main], thresholds, plot_dir)
        if main != calib:
            write_eval_plots(scores[calib], labels[calib], samples_of[calib], thresholds, plot_dir, prefix=calib)
        plot_history(fitted.state.history, plot_dir)
    summary = {
        k: f"acc {m.accuracy:.4f} recall {m.defect_recall:.4f} FRR {m.false_reject_rate:.4f} AUC {m.roc_auc}"
        for k, m in metrics.items()
    }
    logger.info("done in %.1f s (%s); thresholds %s; %s", fit_seconds, device, thresholds, json.dumps(summary))
    return TrainResult(
        run_dir=out,
        card=card,
        metrics=metrics,
        best_epoch=fitted.state.best_epoch,
        epochs_run=fitted.state.epoch,
        train_seconds=fit_seconds,
        images_per_second=images_per_second,
        history=fitted.state.history,
        parts=parts,
        excluded=excluded,
    )


def _probs(logits: np.ndarray) -> np.ndarray:
    """sigmoid in float32, as the network computes it: the exported model reproduces these bit for bit."""
    return torch.sigmoid(torch.as_tensor(logits, dtype=torch.float32)).double().numpy()


def _n_parts(samples: Sequence[Any]) -> int:
    return len({s.group_id for s in samples})


def _fold_platt(net: Any, platt: Platt) -> None:
    """sigmoid(a * (w.x + b) + c) == sigmoid((a w).x + (a b + c)): the scaling becomes the head's weights."""
    with torch.no_grad():
        net.head.weight.mul_(platt.a)
        net.head.bias.mul_(platt.a).add_(platt.b)
    if net.pooling == "lse":  # a * LSE_r(cells) + b == LSE_(r / a)(a * cells + b): the temperature takes the slope
        net.temperature = net.temperature / platt.a


def _notes(config: TrainConfig, fitted: Fitted, validation: str) -> str:
    taps = f", taps {list(config.taps)}" if config.taps else ""
    if config.head_pooling == "lse":
        taps += f", multiple-instance head (log-sum-exp of the heatmap cells, r={config.pool_temperature:g})"
    if config.mode == "head" and config.head_pooling == "lse":
        how = f"head fitted on cached grid features{taps}"
    elif config.mode == "head" and config.head_solver == "lbfgs":
        how = f"head by L-BFGS logistic regression (C={config.head_c}){taps}"
    else:
        how = f"{config.mode} fine-tuning{taps}; best epoch {fitted.state.best_epoch} of {fitted.state.epoch}"
    return f"{how}; {validation}; input {config.input_size} px; scores {config.calibration}-calibrated"


def write_run_drift_reference(
    out: Path, samples: Sequence[Any], scores: np.ndarray, thresholds: Thresholds, version: str
) -> None:
    """What the line should look like for this model: image statistics and scores of (up to 1,000 of) the
    calibration images (out of fold when cross-fitted: the scores new parts get), from the scores just computed
    (no second pass); export ships it to the runner."""
    from inspection.adapt.data import subsample
    from inspection.adapt.reference import MIN_IMAGES, reference_from_scores
    from inspection.drift import REFERENCE_FILE

    if len(samples) < MIN_IMAGES:
        logger.warning("no drift reference: %d calibration images (< %d)", len(samples), MIN_IMAGES)
        return
    picked = subsample(list(range(len(samples))), 1000, seed=0)
    probs = np.asarray(scores, dtype=np.float64)[picked]
    paths = [samples[i].path for i in picked]
    reference_from_scores(paths, probs, thresholds, f"{version} on its calibration photos").save(out / REFERENCE_FILE)
