"""`run_adapt`: adapt a trained run to a new camera or lighting domain, into an ordinary run directory.

Steps: measure the domain gap (source model, source vs target features); re-estimate BatchNorm statistics on the
unlabelled target images; optionally self-train on confident pseudo-labels and fine-tune on a few labelled target
images; measure the gap again (adapted model on target vs source model on source: what the head now receives);
write RUN_DIR2 with the trainer's layout (docs/CONTRACTS.md), card mode "adapted" and the parent version noted,
plus `adapt.json` (this report) and `drift_reference.json` (the target domain as the line's new normal).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inspection.adapt.bn_adapt import BNAdaptStats, adapt_batchnorm, source_bn_stats
from inspection.adapt.config import AdaptConfig
from inspection.adapt.data import list_images, list_labelled, run_source_images, subsample
from inspection.adapt.gap import GapResult, domain_gap, features_and_scores
from inspection.adapt.reference import reference_from_scores
from inspection.adapt.self_train import FitStats, fit_on, self_train
from inspection.config import save_config
from inspection.drift import REFERENCE_FILE
from inspection.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptResult:
    run_dir: Path
    version: str
    parent_version: str
    gap_before: GapResult | None
    gap_after: GapResult | None
    bn: BNAdaptStats
    self_train: FitStats | None
    labelled: FitStats | None
    n_target: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


def _files_fingerprint(parent: str, paths: list[Path]) -> str:
    h = hashlib.sha256(f"parent:{parent}\n".encode())
    for digest in sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths):
        h.update(f"{digest}:target\n".encode())
    return h.hexdigest()


def _check_out(run_dir: Path, out: Path) -> None:
    if out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out} is the source run itself; the adapted run needs its own directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not empty; give a new directory (nothing is overwritten)")


def run_adapt(
    config: AdaptConfig,
    run_dir: Path | str,
    target: Path | str,
    out: Path | str,
    labelled: Path | str | None = None,
) -> AdaptResult:
    """Adapt the run `run_dir` to the unlabelled images under `target` (and optional labelled `labelled/{def_front,
    ok_front}`) into the new run directory `out`."""
    from inspection.train.run_dir import load_run, write_run

    t0 = time.perf_counter()
    run_dir, target, out = Path(run_dir), Path(target), Path(out)
    _check_out(run_dir, out)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    loaded = load_run(run_dir)
    source_net = loaded.net.eval()
    target_paths = subsample(list_images(target), config.max_target_images, config.seed)
    labelled_paths, labelled_targets = list_labelled(Path(labelled)) if labelled is not None else ([], [])
    source_paths, source_groups = run_source_images(loaded.samples, config.max_source_images, config.seed)
    if config.bn_mode == "align" and len(source_paths) < 8:
        raise DataError(
            f"bn_mode=align needs the source images of {run_dir}/samples.json, but {len(source_paths)} of them exist "
            "here; run where they are, or use bn_mode=adabn"
        )
    logger.info(
        "adapting %s (%s) to %d target images from %s; %d source images for statistics",
        loaded.card.version,
        loaded.card.mode,
        len(target_paths),
        target,
        len(source_paths),
    )

    gap_before = fs = None
    if len(source_paths) >= 8:
        fs, _, _ = features_and_scores(source_net, source_paths, config.batch_size)
        ft, _, _ = features_and_scores(source_net, target_paths, config.batch_size)
        gap_before = domain_gap(fs, ft, config.gap, source_groups)
        (logger.warning if gap_before.warning else logger.info)("before adaptation: %s", gap_before.message)

    net = copy.deepcopy(source_net)
    stats = source_bn_stats(source_net, source_paths, config.batch_size) if config.bn_mode == "align" else None
    bn = adapt_batchnorm(net, target_paths, config.batch_size, mode=config.bn_mode, source_stats=stats)
    st = None
    if config.self_train and config.self_train_epochs > 0:
        st = self_train(
            net,
            target_paths,
            config.pseudo_confidence,
            config.self_train_epochs,
            config.self_train_lr,
            config.self_train_max_images,
            config.trainable,
            config.seed,
        )
    lab = None
    if labelled_paths and config.labelled_epochs > 0:
        lab = fit_on(
            net,
            labelled_paths,
            labelled_targets,
            config.labelled_epochs,
            config.labelled_lr,
            config.trainable,
            seed=config.seed,
        )

    ft_after, probs, kept = features_and_scores(net, target_paths, config.batch_size)
    gap_after = domain_gap(fs, ft_after, config.gap, source_groups) if fs is not None else None
    if gap_after is not None:
        (logger.warning if gap_after.warning else logger.info)("after adaptation: %s", gap_after.message)

    parent = loaded.card
    created = datetime.now(UTC)
    fingerprint = _files_fingerprint(parent.data_fingerprint, [target_paths[i] for i in kept])
    notes = (
        f"adapted from {parent.version}: BN {config.bn_mode} on {bn.n_images} unlabelled images of {target}"
        + (f"; self-training on {st.n_images} pseudo-labels" if st else "")
        + (f"; fine-tuned on {lab.n_images} labelled target images" if lab else "")
        + (f"; gap {gap_before.score:.3f} -> {gap_after.score:.3f}" if gap_before and gap_after else "")
        + "; thresholds and calibration are the parent's (no target labels to recalibrate on)"
    )
    card = parent.model_copy(
        update={
            "version": f"{created:%Y%m%dT%H%M%S}-adapted-{fingerprint[:8]}",
            "created_at": created,
            "mode": "adapted",
            "parent_version": parent.version,
            "data_fingerprint": fingerprint,
            "metrics": {},  # no labelled target split to measure on; the registry gate measures on its golden set
            "files": {},
            "notes": notes,
        }
    )
    result = AdaptResult(
        run_dir=out,
        version=card.version,
        parent_version=parent.version,
        gap_before=gap_before,
        gap_after=gap_after,
        bn=bn,
        self_train=st,
        labelled=lab,
        n_target=bn.n_images,
        seconds=time.perf_counter() - t0,
    )
    report = result.to_dict()
    extra = {"adapt": report, "target_score_mean": float(np.mean(probs))}
    write_run(out, net, loaded.config, card, loaded.samples, extra, epoch=int(loaded.checkpoint.get("epoch", 0)))
    save_config(config, out / "adapt_config.yaml")
    (out / "adapt.json").write_text(json.dumps(report, indent=2, default=str))
    reference_from_scores([target_paths[i] for i in kept], probs, card.thresholds, f"{card.version} on {target}").save(
        out / REFERENCE_FILE
    )
    logger.info("adapted run %s written to %s in %.1f s", card.version, out, result.seconds)
    return result
