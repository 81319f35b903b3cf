"""Ingest: validation corpus, quarantine, store, idempotence, labels, near-duplicate groups and splits."""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspection.errors import ConfigError, DataError
from inspection.images import encode_png
from inspection.ingest import (
    IngestConfig,
    apply_review_labels,
    load_samples,
    read_records,
    run_ingest,
    samples_from,
)
from inspection.synth import render_part

CFG = IngestConfig(progress=False, workers=2)


def _part(seed: int, size: int = 128, defect: bool = False) -> np.ndarray:
    return render_part(np.random.default_rng(seed), defect, size)[0]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming a huge image, with a tiny (zlib bomb-like) body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


# name -> expected quarantine reason; built by `bad_corpus`
EXPECTED_BAD = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "text.jpg": "unsupported_format",
    "random.png": "unsupported_format",
    "page.jpeg": "unsupported_format",
    "bomb.png": "decompression_bomb",
    "tiny.png": "too_small",
    "long_side.png": "too_large",
    "big_file.bmp": "too_large_file",
    "corrupt_body.jpg": "corrupt",
    "anim.gif": "unsupported_format",
    "photo.webp": "unsupported_format",
    "escape_link.png": "path_escapes_source",
    "dotdot_link.png": "path_escapes_source",
    "escape_dir": "path_escapes_source",
    "dangling.png": "unreadable",
}
# valid but unusual: name -> (channels_in, bit_depth_in, format)
EXPECTED_GOOD = {
    "sixteen_bit.png": (1, 16, "png"),
    "rgba.png": (4, 8, "png"),
    "grey.png": (1, 8, "png"),
    "colour.bmp": (3, 8, "bmp"),
    "colour.tif": (3, 8, "tiff"),
    "grey.jpg": (1, 8, "jpeg"),
}
CORPUS_CFG = IngestConfig(progress=False, workers=2, max_bytes=200_000, max_side=4096)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    src = root / "drop"
    folder = src / "def_front"
    folder.mkdir(parents=True)
    outside = root / "outside"
    outside.mkdir()
    cv2.imwrite(str(outside / "secret.png"), _part(1)[:, :, 0])
    grey = _part(2)[:, :, 0]
    jpg = _jpeg(grey)
    png = encode_png(_part(3))
    rng = np.random.default_rng(0)

    files = {
        "empty.jpg": b"",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.png": png[: len(png) // 2],
        "text.jpg": b"this is not a photo, just a note someone saved with the wrong name\n",
        "random.png": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "page.jpeg": b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        "bomb.png": _bomb_png(100_000, 100_000),
        "tiny.png": encode_png(np.full((8, 8, 3), 128, np.uint8)),
        "long_side.png": encode_png(np.full((40, 5000, 3), 100, np.uint8)),
        "big_file.bmp": cv2.imencode(".bmp", rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))[1].tobytes(),
        # SOI, JFIF header and EOI intact, tables/frame header/data overwritten: libjpeg cannot decode it
        "corrupt_body.jpg": jpg[:20] + bytes(rng.integers(0, 256, len(jpg) - 22, dtype=np.uint8)) + b"\xff\xd9",
        "anim.gif": b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x00\x00\x00\x00\x00,"
        b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
        "photo.webp": b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(40),
        # valid but unusual
        "sixteen_bit.png": cv2.imencode(".png", (grey.astype(np.uint16) * 257))[1].tobytes(),
        "rgba.png": cv2.imencode(".png", np.dstack([_part(4), np.full((128, 128), 255, np.uint8)]))[1].tobytes(),
        "grey.png": cv2.imencode(".png", _part(5)[:, :, 0])[1].tobytes(),
        "colour.bmp": cv2.imencode(".bmp", _part(6))[1].tobytes(),
        "colour.tif": cv2.imencode(".tif", _part(7))[1].tobytes(),
        "grey.jpg": jpg,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    os.symlink(outside / "secret.png", folder / "escape_link.png")  # absolute link out of the source
    os.symlink("../../outside/secret.png", folder / "dotdot_link.png")  # '..' link out of the source
    os.symlink(outside, folder / "escape_dir")  # a folder link out of the source
    os.symlink(folder / "no_such_file.png", folder / "dangling.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # OS dropping: ignored, not quarantined
    return src


@pytest.fixture(scope="module")
def corpus_store(bad_corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("corpus_store")
    result = run_ingest(CORPUS_CFG, [bad_corpus], store)
    return store, result


def test_each_bad_file_is_quarantined_with_its_reason(corpus_store):
    store, result = corpus_store
    records = {Path(r.source_path).name: r for r in read_records(store)}
    got = {name: records[name].quarantine_reason for name in EXPECTED_BAD}
    assert got == EXPECTED_BAD
    for name in EXPECTED_BAD:
        assert records[name].status == "quarantined"
        assert records[name].quarantine_detail
    assert len(EXPECTED_BAD) >= 12
    assert ".DS_Store" not in records


def test_quarantine_keeps_readable_bad_files_and_never_reads_outside(corpus_store, bad_corpus):
    store, _ = corpus_store
    records = {Path(r.source_path).name: r for r in read_records(store)}
    for name, reason in EXPECTED_BAD.items():
        rec = records[name]
        if reason in ("path_escapes_source", "unreadable"):
            assert rec.stored_path is None and rec.sha256 is None
        else:
            copy = store / rec.stored_path
            assert copy.is_file(), name
            assert copy.read_bytes() == (bad_corpus / "def_front" / name).read_bytes()
    secret = (bad_corpus.parent / "outside" / "secret.png").read_bytes()
    stored = [p.read_bytes() for p in store.rglob("*") if p.is_file() and p.suffix in (".png", ".bin")]
    assert secret not in stored


def test_valid_unusual_images_are_accepted_and_described(corpus_store):
    store, result = corpus_store
    records = {Path(r.source_path).name: r for r in read_records(store)}
    for name, (channels, depth, fmt) in EXPECTED_GOOD.items():
        rec = records[name]
        assert rec.status == "accepted", (name, rec.quarantine_reason, rec.quarantine_detail)
        assert (rec.channels_in, rec.bit_depth_in, rec.format) == (channels, depth, fmt)
        assert (rec.width, rec.height) == (128, 128)
        assert (store / rec.stored_path).is_file()
        assert rec.label == "defect" and rec.label_source == "folder"
    assert result.accepted == len(EXPECTED_GOOD)
    assert result.n_quarantined == len(EXPECTED_BAD)
    expected_counts: dict[str, int] = {}
    for reason in EXPECTED_BAD.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert result.quarantined == expected_counts


def test_manifest_is_sqlite_in_wal_mode_with_record_columns(corpus_store):
    store, _ = corpus_store
    con = sqlite3.connect(store / "manifest.sqlite")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1] for row in con.execute("PRAGMA table_info(records)")}
    finally:
        con.close()
    from inspection.schemas import ManifestRecord

    assert set(ManifestRecord.model_fields) <= columns


def test_rerun_adds_nothing(corpus_store, bad_corpus):
    store, first = corpus_store
    before = read_records(store)
    again = run_ingest(CORPUS_CFG, [bad_corpus], store)
    assert again.accepted == 0 and again.duplicates == 0 and again.n_quarantined == 0
    assert again.already_known == first.n_files
    assert [r.model_dump() for r in read_records(store)] == [r.model_dump() for r in before]


def test_exact_duplicates_are_recorded_not_stored_twice(tmp_path):
    src = tmp_path / "src"
    for folder in ("def_front", "ok_front", "ok_front/again"):
        (src / folder).mkdir(parents=True)
    data = encode_png(_part(11))
    (src / "ok_front" / "a.png").write_bytes(data)
    (src / "ok_front" / "again" / "b.png").write_bytes(data)
    (src / "def_front" / "c.png").write_bytes(data)  # same bytes, other label: conflicts to report
    result = run_ingest(CFG, [src], tmp_path / "store")
    # the sorted walk meets def_front/c.png first; both ok_front copies then disagree with its label
    assert (result.accepted, result.duplicates, result.label_conflicts) == (1, 2, 2)
    records = read_records(tmp_path / "store")
    acc = [r for r in records if r.status == "accepted"]
    dups = [r for r in records if r.status == "duplicate"]
    assert len(acc) == 1 and all(d.duplicate_of == acc[0].sha256 for d in dups)
    assert len(list((tmp_path / "store" / "images").rglob("*.png"))) == 1
    assert acc[0].label == "defect" and acc[0].source_path.endswith("c.png")


def test_label_mapping_is_configurable_and_other_folders_are_unlabelled(tmp_path):
    src = tmp_path / "line3"
    for i, folder in enumerate(("bad", "good", "2024-05-01/bad", "misc")):
        (src / folder).mkdir(parents=True, exist_ok=True)
        (src / folder / f"p{i}.png").write_bytes(encode_png(_part(20 + i)))
    cfg = IngestConfig(progress=False, label_map={"bad": "defect", "good": "ok"})
    run_ingest(cfg, [src], tmp_path / "store")
    labels = {Path(r.source_path).name: (r.label, r.label_source) for r in read_records(tmp_path / "store")}
    assert labels == {
        "p0.png": ("defect", "folder"),
        "p1.png": ("ok", "folder"),
        "p2.png": ("defect", "folder"),
        "p3.png": (None, None),
    }
    with pytest.raises(ConfigError, match="allowed: ok, defect"):
        run_ingest(IngestConfig(label_map={"bad": "broken"}), [src], tmp_path / "store2")


def test_config_errors_say_what_is_allowed(tmp_path):
    from inspection.config import load_config

    with pytest.raises(ConfigError, match="summing to 1"):
        load_config(IngestConfig, None, ["split_fractions=0.5,0.5,0.5"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(IngestConfig, None, ["seeed=1"])
    with pytest.raises(DataError, match="source not found"):
        run_ingest(CFG, [tmp_path / "nope"], tmp_path / "store")


def _rotate(img: np.ndarray, angle: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


VARIANTS = {
    "r37": lambda im: _rotate(im, 37),
    "r113": lambda im: _rotate(im, 113),
    "r90": lambda im: np.ascontiguousarray(np.rot90(im)),
    "r193": lambda im: _rotate(im, 193),
    "flip": lambda im: np.ascontiguousarray(im[:, ::-1]),
    "flip_r121": lambda im: _rotate(np.ascontiguousarray(im[::-1]), 121),
}


@pytest.fixture(scope="module")
def rotated_set(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """synth_dir plus rotated (any angle) and mirrored copies of 8 of its images, saved as JPEG."""
    root = tmp_path_factory.mktemp("rotated")
    src = root / "src"
    shutil.copytree(synth_dir, src)
    originals = sorted((src / "def_front").glob("*.png"))[:4] + sorted((src / "ok_front").glob("*.png"))[:4]
    for path in originals:
        img = cv2.imread(str(path))
        for tag, fn in VARIANTS.items():
            cv2.imwrite(str(path.with_name(f"{path.stem}_{tag}.jpg")), fn(img), [cv2.IMWRITE_JPEG_QUALITY, 92])
    store = root / "store"
    result = run_ingest(CFG, [src], store)
    return src, store, originals, result


def test_rotated_and_mirrored_copies_share_one_group(rotated_set):
    src, store, originals, result = rotated_set
    by_name = {Path(r.source_path).stem: r for r in read_records(store, status="accepted")}
    groups = []
    for path in originals:
        ids = {by_name[path.stem].group_id} | {by_name[f"{path.stem}_{tag}"].group_id for tag in VARIANTS}
        assert len(ids) == 1, f"copies of {path.name} split over groups {ids}"
        groups.append(ids.pop())
    assert len(set(groups)) == len(originals), "different parts were merged into one group"
    # the other synthetic parts are all different: they stay alone
    sizes = result.group_sizes
    assert sizes.get(len(VARIANTS) + 1) == len(originals)
    assert sum(n for size, n in sizes.items() if size > 1) == len(originals)


def test_no_group_crosses_splits_and_splits_are_stratified(rotated_set):
    _, store, _, _ = rotated_set
    samples = load_samples(store)
    split_of_group: dict[str, set[str]] = {}
    for s in samples:
        split_of_group.setdefault(s.group_id, set()).add(s.split)
    assert all(len(v) == 1 for v in split_of_group.values())
    for label in ("ok", "defect"):
        n = {sp: sum(1 for s in samples if s.label == label and s.split == sp) for sp in ("train", "val", "test")}
        total = sum(n.values())
        assert n["val"] > 0 and n["test"] > 0
        assert abs(n["train"] / total - 0.7) < 0.12


def test_new_files_keep_existing_splits(synth_dir, tmp_path):
    src = tmp_path / "src"
    for folder in ("def_front", "ok_front"):
        (src / folder).mkdir(parents=True)
        for p in sorted((synth_dir / folder).glob("*.png"))[:25]:
            shutil.copy(p, src / folder / p.name)
    store = tmp_path / "store"
    run_ingest(CFG, [src], store)
    before = {s.sha256: (s.split, s.group_id) for s in load_samples(store)}
    for folder in ("def_front", "ok_front"):
        for p in sorted((synth_dir / folder).glob("*.png"))[25:]:
            shutil.copy(p, src / folder / p.name)
    # a near-duplicate of an existing image must join that image's group and split
    first = sorted((src / "ok_front").glob("*.png"))[0]
    cv2.imwrite(str(src / "ok_front" / "late_copy.png"), _rotate(cv2.imread(str(first)), 71))
    second = run_ingest(CFG, [src], store)
    after = {s.sha256: (s.split, s.group_id) for s in load_samples(store)}
    assert second.accepted == len(after) - len(before) == 81 - 50
    assert {k: after[k] for k in before} == before
    late = next(r for r in read_records(store, "accepted") if r.source_path.endswith("late_copy.png"))
    orig = next(r for r in read_records(store, "accepted") if r.source_path == str(first))
    assert (late.group_id, late.split) == (orig.group_id, orig.split)
    # the same images ingested in one go with the same seed give the same splits (the seed fixes them)
    again = tmp_path / "store_again"
    run_ingest(CFG, [src], again)
    assert {s.sha256 for s in load_samples(again)} == set(after)


def test_split_seed_changes_assignment_but_is_reproducible(synth_dir, tmp_path):
    a = {s.sha256: s.split for s in samples_from(synth_dir, tmp_path / "a", IngestConfig(progress=False, seed=1))}
    b = {s.sha256: s.split for s in samples_from(synth_dir, tmp_path / "b", IngestConfig(progress=False, seed=1))}
    c = {s.sha256: s.split for s in samples_from(synth_dir, tmp_path / "c", IngestConfig(progress=False, seed=2))}
    assert a == b
    assert a != c


def test_samples_from_store_manifest_and_raw_folder(synth_store, synth_dir, tmp_path):
    from_store = samples_from(synth_store, tmp_path / "unused")
    from_manifest = samples_from(synth_store / "manifest.sqlite", tmp_path / "unused")
    assert from_store == from_manifest
    assert not (tmp_path / "unused").exists()
    assert len(from_store) == 80
    assert {s.label for s in from_store} == {"ok", "defect"}
    assert all(s.path.is_absolute() and s.path.is_file() for s in from_store)
    assert {s.split for s in from_store} == {"train", "val", "test"}
    raw = samples_from(synth_dir, tmp_path / "work")
    assert sorted(s.sha256 for s in raw) == sorted(s.sha256 for s in from_store)
    with pytest.raises(DataError, match="neither a store"):
        samples_from(tmp_path / "missing", tmp_path / "w2")


def test_review_labels_take_precedence_over_folder_labels(synth_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_dir, src)
    store = tmp_path / "store"
    run_ingest(CFG, [src], store)
    samples = load_samples(store)
    ok = next(s for s in samples if s.label == "ok")
    defect = next(s for s in samples if s.label == "defect")
    changed = apply_review_labels(
        store,
        [
            (ok.sha256, "defect", "qa1", "2025-01-01T10:00:00+00:00"),
            (defect.sha256, "ok", "qa1", "2025-01-01T10:00:00+00:00"),
            (defect.sha256, "defect", "qa2", "2025-01-02T10:00:00+00:00"),  # later decision wins
        ],
    )
    assert changed == 2
    labels = {s.sha256: s.label for s in load_samples(store)}
    assert labels[ok.sha256] == "defect" and labels[defect.sha256] == "defect"
    rec = next(r for r in read_records(store, "accepted") if r.sha256 == ok.sha256)
    assert rec.label_source == "review"
    # a re-run with new files does not bring the folder label back
    extra = encode_png(_part(99))
    (src / "ok_front" / "new.png").write_bytes(extra)
    import hashlib

    new_sha = hashlib.sha256(extra).hexdigest()
    # a review of an image not ingested yet is applied when it arrives
    apply_review_labels(store, [(new_sha, "defect", "qa1", "2025-01-03T10:00:00+00:00")])
    run_ingest(CFG, [src], store)
    labels = {s.sha256: s.label for s in load_samples(store)}
    assert labels[ok.sha256] == "defect" and labels[new_sha] == "defect"
    with pytest.raises(DataError, match="allowed: ok, defect"):
        apply_review_labels(store, [(ok.sha256, "scrap", "qa1", "2025-01-04T00:00:00")])
