"""`run_ingest`: camera drop folders -> validated, deduplicated, grouped and split images in a store.

Steps: walk the sources safely; read, hash and validate each file (threads: hashlib and OpenCV release the
GIL); copy accepted images into the content-addressed store and bad ones into quarantine; group near-duplicates
over the whole store; give new groups a split; record everything in the manifest. A re-run skips files it has
already recorded, so it only adds what is new, and never moves an image that already has a split.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from inspection.errors import DataError, ImageValidationError
from inspection.images import decode_image_info, read_image
from inspection.ingest import dedup
from inspection.ingest.config import IngestConfig
from inspection.ingest.labels import parse_label
from inspection.ingest.manifest import (
    MANIFEST_NAME,
    Sample,
    connect,
    insert_records,
    label_conflicts,
    latest_review_labels,
    load_descriptors,
    load_samples,
    save_descriptors,
    type_counts,
)
from inspection.ingest.split import SPLITS, assign_splits
from inspection.ingest.store import (
    ESCAPES_SOURCE,
    UNREADABLE,
    Candidate,
    iter_candidates,
    quarantine_name,
    stored_relpath,
)
from inspection.schemas import ManifestRecord, RecordStatus, Split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    store: Path
    n_files: int  # files found under the sources this run
    already_known: int  # of those, already in the manifest (skipped)
    accepted: int  # new images stored
    duplicates: int  # new files whose bytes equal an image already stored
    quarantined: dict[str, int]  # reason -> new files quarantined
    label_conflicts: int  # duplicates found under a folder with a different label than the stored image
    total_accepted: int  # images in the store after this run
    groups: int  # near-duplicate groups over the whole store
    group_sizes: dict[int, int]  # group size -> number of groups
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> images
    groups_merged: int = 0  # earlier groups joined by a new image (their splits were unified)
    # images of the store per near-duplicate method: "impeller" (centred on the round cavity) or "general"
    # (parts without one: aligned on the outline); each method groups its own images
    group_methods: dict[str, int] = field(default_factory=dict)
    # physical parts whose photos carry both labels: group id -> {"ok": n, "defect": n}; training keeps them out
    # until QA settles them (review app, "same part, labels disagree")
    mixed_label_parts: dict[str, dict[str, int]] = field(default_factory=dict)
    # defect photos of the store per defect type (label_map "defect:<type>" or a QA type); empty: untyped
    defect_types: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())


@dataclass
class _Outcome:
    candidate: Candidate
    sha256: str | None = None
    known: bool = False  # (source_path, sha256) already recorded
    reason: str | None = None
    detail: str | None = None
    fmt: str | None = None
    width: int | None = None
    height: int | None = None
    channels: int | None = None
    bit_depth: int | None = None
    features: dedup.Features | None = None


def _label_for(candidate: Candidate, label_map: dict[str, str]) -> tuple[str | None, str | None]:
    """(label, defect type) of a candidate's folder; the deepest folder with a mapped name decides
    (drop/2024-05-01/def_front/x.jpg -> def_front; crack/x.jpg with crack: "defect:crack" -> defect, crack)."""
    for name in reversed(candidate.labels_from):
        if name in label_map:
            return parse_label(label_map[name])
    return None, None


class _Processor:
    """Reads, hashes, validates and stores one candidate; called from worker threads."""

    def __init__(self, config: IngestConfig, store: Path, seen: set[tuple[str, str | None]], accepted: set[str]):
        self.config = config
        self.limits = config.limits
        self.store = store
        self.seen = seen
        self.accepted = accepted

    def _write(self, path: Path, data: bytes) -> None:
        if path.exists():
            return
        # unique temporary name per thread: two threads may store identical bytes at once
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _too_large(self, c: Candidate, out: _Outcome) -> _Outcome:
        digest = hashlib.sha256()
        with open(c.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        out.sha256 = digest.hexdigest()
        if (str(c.path), out.sha256) in self.seen:
            out.known = True
            return out
        size = c.path.stat().st_size
        out.reason = "too_large_file"
        out.detail = f"{size} bytes exceeds the limit of {self.limits.max_bytes}"
        target = self.store / "quarantine" / quarantine_name(c.path, out.sha256, c.path.suffix)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            shutil.copyfile(c.path, tmp)
            os.replace(tmp, target)
        return out

    def __call__(self, c: Candidate) -> _Outcome:
        out = _Outcome(c)
        if c.refused:
            out.known = (str(c.path), None) in self.seen
            out.reason = c.refused
            out.detail = (
                "the path leads outside the source folder (symlink or '..'); not read, not copied"
                if c.refused == ESCAPES_SOURCE
                else "the path cannot be read (dangling link or no permission)"
            )
            return out
        try:
            with open(c.path, "rb") as fh:
                data = fh.read(self.limits.max_bytes + 1)
        except OSError as exc:
            out.known = (str(c.path), None) in self.seen
            out.reason, out.detail = UNREADABLE, f"cannot read the file: {exc.strerror or exc}"
            return out
        if len(data) > self.limits.max_bytes:
            # too big to take in memory: hash and quarantine it by streaming, keeping the whole file
            return self._too_large(c, out)
        out.sha256 = hashlib.sha256(data).hexdigest()
        if (str(c.path), out.sha256) in self.seen:
            out.known = True
            return out
        if out.sha256 in self.accepted:
            return out  # a duplicate of a stored image: no need to decode it again
        try:
            rgb, info = decode_image_info(data, self.limits)
        except ImageValidationError as exc:
            out.reason, out.detail = exc.reason, exc.detail
            self._write(self.store / "quarantine" / quarantine_name(c.path, out.sha256, c.path.suffix), data)
            return out
        except Exception as exc:  # a decoder bug must not stop the batch: quarantine and go on
            logger.exception("unexpected error decoding %s", c.path)
            out.reason, out.detail = "corrupt", f"decoder failed: {type(exc).__name__}: {exc}"
            self._write(self.store / "quarantine" / quarantine_name(c.path, out.sha256, c.path.suffix), data)
            return out
        out.fmt, out.width, out.height = info.format, info.width, info.height
        out.channels, out.bit_depth = info.channels, info.bit_depth
        out.features = dedup.features(rgb)
        self._write(self.store / stored_relpath(out.sha256, info.format), data)
        return out


def _ordered_map(pool: ThreadPoolExecutor, fn, items: list, window: int) -> Iterator:
    """pool.map with a bounded number of results in flight (large images must not pile up in memory)."""
    pending = []
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    for item in it:
        yield pending.pop(0).result()
        pending.append(pool.submit(fn, item))
    for fut in pending:
        yield fut.result()


def _progress(iterable, total: int, enabled: bool):
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, unit="img", desc="ingest")
        except ImportError:
            pass
    return iterable


def run_ingest(config: IngestConfig, sources: list[Path], store: Path) -> IngestResult:
    """Ingest every file under `sources` into `store` (created if needed); see the module docstring."""
    t0 = time.perf_counter()
    config.validate()
    store = Path(store)
    sources = [Path(s) for s in sources]
    if not sources:
        raise DataError("no source folders given; pass at least one folder of images")
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise DataError(f"source not found: {', '.join(missing)}")
    store.mkdir(parents=True, exist_ok=True)
    candidates: list[Candidate] = []
    for source in sources:
        candidates.extend(iter_candidates(source, config.ignore_names))
    now = datetime.now(UTC)

    with connect(store / MANIFEST_NAME, create=True) as con:
        seen = {(p, s) for p, s in con.execute("SELECT source_path, sha256 FROM records")}
        accepted_rows = con.execute(
            "SELECT sha256, label, group_id, split FROM records WHERE status = 'accepted' ORDER BY id"
        ).fetchall()
        accepted = {row[0] for row in accepted_rows}
        accepted_label = {row[0]: row[1] for row in accepted_rows}
        reviews = latest_review_labels(con)  # sha256 -> (label, type): QA's word outranks the folder's

        processor = _Processor(config, store, seen, set(accepted))
        workers = config.workers or os.cpu_count() or 1
        new_records: list[ManifestRecord] = []
        new_features: dict[str, dedup.Features] = {}
        reasons: Counter[str] = Counter()
        n_known = n_dup = n_conflicts = 0
        run_seen: set[tuple[str, str | None]] = set()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = _ordered_map(pool, processor, candidates, window=4 * workers)
            for out in _progress(results, len(candidates), config.progress):
                c = out.candidate
                key = (str(c.path), out.sha256)
                if out.known or key in run_seen:
                    n_known += 1
                    continue
                run_seen.add(key)
                folder_label, folder_type = _label_for(c, config.label_map)
                base = {"source_path": str(c.path), "sha256": out.sha256, "ingested_at": now}
                if out.reason is not None:
                    reasons[out.reason] += 1
                    logger.debug("quarantined %s: %s (%s)", c.path, out.reason, out.detail)
                    q = (
                        None
                        if out.reason in (ESCAPES_SOURCE, UNREADABLE)
                        else quarantine_name(c.path, out.sha256, c.path.suffix)
                    )
                    new_records.append(
                        ManifestRecord(
                            **base,
                            status=RecordStatus.quarantined,
                            label=folder_label,
                            label_source="folder" if folder_label else None,
                            defect_type=folder_type,
                            stored_path=f"quarantine/{q}" if q else None,
                            quarantine_reason=out.reason,
                            quarantine_detail=out.detail,
                        )
                    )
                    continue
                sha = out.sha256
                assert sha is not None
                if sha in accepted:
                    n_dup += 1
                    if folder_label and accepted_label.get(sha) and folder_label != accepted_label[sha]:
                        n_conflicts += 1
                        logger.warning(
                            "label conflict: %s (%s) has the same bytes as a stored image labelled %s",
                            c.path,
                            folder_label,
                            accepted_label[sha],
                        )
                    new_records.append(
                        ManifestRecord(
                            **base,
                            status=RecordStatus.duplicate,
                            duplicate_of=sha,
                            label=folder_label,
                            label_source="folder" if folder_label else None,
                            defect_type=folder_type,
                        )
                    )
                    continue
                accepted.add(sha)
                label, kind = reviews.get(sha, (folder_label, folder_type))
                source = "review" if sha in reviews else "folder"
                accepted_label[sha] = label
                assert out.features is not None
                new_features[sha] = out.features
                new_records.append(
                    ManifestRecord(
                        **base,
                        status=RecordStatus.accepted,
                        stored_path=stored_relpath(sha, out.fmt or "bin"),
                        label=label,
                        label_source=source if label else None,
                        defect_type=kind,
                        width=out.width,
                        height=out.height,
                        channels_in=out.channels,
                        bit_depth_in=out.bit_depth,
                        format=out.fmt,
                    )
                )

        # --- near-duplicate groups over the whole store, then splits for new groups
        old_desc = load_descriptors(con)
        save_descriptors(con, ((sha, dedup.stored_vector(f)) for sha, f in new_features.items()))
        old_group = {sha: (gid, split) for sha, _, gid, split in accepted_rows}
        order = [row[0] for row in accepted_rows] + [r.sha256 for r in new_records if r.status == "accepted"]
        stored_paths = dict(con.execute("SELECT sha256, stored_path FROM records WHERE status = 'accepted'"))
        stored_paths.update({r.sha256: r.stored_path for r in new_records if r.status == "accepted"})
        grouping = _group_and_split(
            config, store, order, old_desc, new_features, old_group, accepted_label, stored_paths
        )
        group_of, split_of, merged = grouping.group_of, grouping.split_of, grouping.merged
        if grouping.migrated:  # descriptors recomputed for a store written by an older version: keep them
            save_descriptors(con, grouping.migrated)

        for i, rec in enumerate(new_records):
            twin = rec.sha256 if rec.status == "accepted" else rec.duplicate_of
            if twin in group_of:
                new_records[i] = rec.model_copy(update={"group_id": group_of[twin], "split": Split(split_of[twin])})
        insert_records(con, new_records)
        moved = [
            (group_of[s], split_of[s], s) for s, (g, sp) in old_group.items() if (g, sp) != (group_of[s], split_of[s])
        ]
        con.executemany("UPDATE records SET group_id = ?, split = ? WHERE sha256 = ? AND status = 'accepted'", moved)

        split_counts = {s: {} for s in SPLITS}
        for split, label, n in con.execute(
            "SELECT split, COALESCE(label, 'unlabelled'), COUNT(*) FROM records WHERE status = 'accepted' "
            "GROUP BY split, label"
        ):
            split_counts.setdefault(split or "none", {})[label] = n
        types = type_counts(con)

    sizes = Counter(Counter(group_of.values()).values())
    mixed = {c.group_id: c.counts for c in label_conflicts(store)}
    result = IngestResult(
        store=store,
        n_files=len(candidates),
        already_known=n_known,
        accepted=len(new_features),
        duplicates=n_dup,
        quarantined=dict(sorted(reasons.items())),
        label_conflicts=n_conflicts,
        total_accepted=len(order),
        groups=len(set(group_of.values())),
        group_sizes=dict(sorted(sizes.items())),
        split_counts=split_counts,
        groups_merged=merged,
        group_methods={m: n for m in dedup.METHODS if (n := sum(v == m for v in grouping.method_of.values()))},
        mixed_label_parts=mixed,
        defect_types=types,
        wall_s=time.perf_counter() - t0,
    )
    logger.info(
        "ingest: %d files, %d already known, %d accepted, %d duplicates, %d quarantined %s; store holds %d images "
        "in %d near-duplicate groups (%d with copies; grouped by %s); %.1f s",
        result.n_files,
        result.already_known,
        result.accepted,
        result.duplicates,
        result.n_quarantined,
        result.quarantined or "",
        result.total_accepted,
        result.groups,
        sum(n for size, n in sizes.items() if size > 1),
        ", ".join(f"{m} {n}" for m, n in result.group_methods.items()) or "nothing",
        result.wall_s,
    )
    if types:
        logger.info("defect photos per type: %s", ", ".join(f"{t} {n}" for t, n in types.items()))
    if merged:
        logger.warning("%d earlier groups were joined by new near-duplicates; their images now share one split", merged)
    if mixed:
        logger.warning(
            "%d parts carry both labels (%s): training keeps them out until QA settles them in the review app",
            len(mixed),
            ", ".join(f"{g}: {c['ok']} ok + {c['defect']} defect" for g, c in mixed.items()),
        )
    return result


@dataclass
class _Grouping:
    group_of: dict[str, str]  # sha -> group id
    split_of: dict[str, str]  # sha -> split
    merged: int  # earlier groups joined
    method_of: dict[str, str]  # sha -> near-duplicate method
    migrated: list[tuple[str, np.ndarray]] = field(default_factory=list)  # stored vectors recomputed


def _group_and_split(
    config: IngestConfig,
    store: Path,
    order: list[str],
    old_desc: dict[str, np.ndarray],
    new_features: dict[str, dedup.Features],
    old_group: dict[str, tuple[str | None, str | None]],
    labels: dict[str, str | None],
    stored_paths: dict[str, str],
) -> _Grouping:
    """Groups, splits and near-duplicate methods of every accepted image (see `_Grouping`)."""
    if not order:
        return _Grouping({}, {}, 0, {})
    stored = {sha: dedup.from_stored(old_desc.get(sha)) for sha in order if sha not in new_features}
    if not new_features and all(old_group.get(s, (None, None))[0] for s in order):
        # nothing new: keep the groups and splits as recorded (a re-run must be cheap and change nothing);
        # a store from before the general method was grouped by the impeller method alone
        methods = {s: m[0] if m else dedup.IMPELLER for s, m in stored.items()}
        group_of = {s: old_group[s][0] for s in order}
        split_of = {s: old_group[s][1] for s in order}
        return _Grouping(group_of, split_of, 0, methods)  # type: ignore[arg-type]  # all set: checked above
    method_of: dict[str, str] = {}
    desc_of: dict[str, np.ndarray] = {}
    migrated: list[tuple[str, np.ndarray]] = []
    for sha in order:
        found = stored.get(sha)
        if sha in new_features:
            f = new_features[sha]
            method_of[sha], desc_of[sha] = f.method, f.descriptor
        elif found is not None:
            method_of[sha], desc_of[sha] = found
        else:  # a store from an older version: recompute once, and keep
            f = dedup.features(read_image(store / stored_paths[sha]))
            method_of[sha], desc_of[sha] = f.method, f.descriptor
            migrated.append((sha, dedup.stored_vector(f)))

    def signature_of(sha: str) -> object:
        if sha in new_features:
            return new_features[sha].signature
        # earlier images: recompute from the stored copy instead of keeping ~10-16 kB per image in the manifest
        return dedup.features(read_image(store / stored_paths[sha]), method_of[sha]).signature

    comp: dict[str, str] = {}  # sha -> sha of its group's first member
    for method in dedup.METHODS:
        shas = [s for s in order if method_of[s] == method]  # each method groups its own images
        if not shas:
            continue
        desc = np.stack([desc_of[s] for s in shas])
        if config.near_dup_neighbours <= 0:
            labels_m = np.arange(len(shas))
        else:
            group, max_distance, min_similarity = (
                (dedup.group_near_duplicates, config.near_dup_max_distance, config.near_dup_min_similarity)
                if method == dedup.IMPELLER
                else (dedup.group_general, config.near_dup_general_max_distance, config.near_dup_general_min_similarity)
            )
            labels_m = group(
                desc,
                lambda i, shas=shas: signature_of(shas[i]),
                max_distance,
                min_similarity,
                config.near_dup_neighbours,
            )
        comp.update({s: shas[int(c)] for s, c in zip(shas, labels_m, strict=True)})
    members: dict[str, list[str]] = {}
    for sha in order:
        members.setdefault(comp[sha], []).append(sha)

    group_of: dict[str, str] = {}
    fixed_split: dict[str, str] = {}
    new_groups: dict[str, tuple[str | None, int]] = {}
    merged = 0
    for shas in members.values():
        old = [old_group[s] for s in shas if s in old_group and old_group[s][0]]
        if old:
            # keep the id and split of the largest earlier group in this component
            (gid, split), _ = Counter(old).most_common(1)[0]
            merged += len({g for g, _ in old}) - 1
            fixed_split[gid] = split
        else:
            gid = "g" + min(shas)[:16]
            votes = Counter(labels.get(s) for s in shas if labels.get(s))
            new_groups[gid] = (votes.most_common(1)[0][0] if votes else None, len(shas))
        for s in shas:
            group_of[s] = gid
    existing_counts: Counter[tuple[str | None, str]] = Counter()
    for s, gid in group_of.items():
        if gid in fixed_split:
            existing_counts[(labels.get(s), fixed_split[gid])] += 1
    splits = assign_splits(new_groups, config.split_fractions, config.seed, fixed_split, existing_counts)
    return _Grouping(group_of, {s: splits[g] for s, g in group_of.items()}, merged, method_of, migrated)


def samples_from(data: Path, work_dir: Path, config: IngestConfig | None = None) -> list[Sample]:
    """Samples of `data`: a store folder, a manifest file, or a raw image folder (ingested into `work_dir`).

    A raw folder is ingested with `config` (default IngestConfig()); re-running is cheap because ingest only
    adds files it has not recorded yet.
    """
    data = Path(data)
    if data.is_file() and data.suffix == ".sqlite":
        return load_samples(data)
    if (data / MANIFEST_NAME).is_file():
        return load_samples(data)
    if not data.is_dir():
        raise DataError(f"{data} is neither a store folder, a {MANIFEST_NAME} file, nor a folder of images")
    run_ingest(config or IngestConfig(), [data], Path(work_dir))
    samples = load_samples(Path(work_dir))
    if not samples:
        raise DataError(f"no usable images found under {data} (see the quarantine in {work_dir})")
    return samples
