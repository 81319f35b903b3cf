"""The content-addressed image store and the safe walk over source folders.

Accepted images are kept once, under their sha256 (`images/<sha[:2]>/<sha>.<ext>`, the original bytes); bad
files are copied to `quarantine/` so nothing is lost. Writes go to a temporary name and are renamed, so a crash
never leaves a half-written image under a valid name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EXTENSIONS = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "tiff": "tif"}

# reason codes of ingest itself (images.REASONS covers the content)
ESCAPES_SOURCE = "path_escapes_source"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Candidate:
    """A file found under a source folder."""

    path: Path  # as found (not resolved), for the record's source_path
    root: Path  # the source folder it was found under
    labels_from: tuple[str, ...]  # folder names from the source folder down to the file's folder
    refused: str | None = None  # set when the path must not be read (escapes the source)


def stored_relpath(sha256: str, fmt: str) -> str:
    return f"images/{sha256[:2]}/{sha256}.{EXTENSIONS.get(fmt, 'bin')}"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def quarantine_name(source_path: Path, sha256: str | None, suffix: str) -> str:
    # unreadable files have no content hash: name them by the hash of their path
    key = sha256 or "path-" + hashlib.sha256(str(source_path).encode()).hexdigest()
    ext = suffix.lower().lstrip(".")
    ext = ext if ext.isalnum() and len(ext) <= 5 else "bin"
    return f"{key}.{ext}"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def iter_candidates(source: Path, ignore_names: tuple[str, ...] = ()) -> list[Candidate]:
    """Every file under `source`, in sorted order; links leading outside `source` are returned refused.

    Symlinks inside the source are followed (a camera share may link day folders), each real folder once.
    """
    source = Path(source)
    if ".." in source.parts:
        # a source given as a/../b is resolved by the caller's intent; only paths found inside are policed
        source = Path(os.path.normpath(source))
    root_real = source.resolve()
    if source.is_file():
        return [Candidate(source, source.parent, (source.parent.name,))]
    if not source.is_dir():
        raise FileNotFoundError(f"source folder not found: {source}")
    out: list[Candidate] = []
    seen_dirs: set[Path] = set()

    def walk(folder: Path, rel: tuple[str, ...]) -> None:
        real = folder.resolve()
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list %s: %s", folder, exc)
            out.append(Candidate(folder, source, rel, refused=UNREADABLE))
            return
        for entry in entries:
            path = folder / entry.name
            if entry.name in ignore_names:
                continue
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if not _inside(target, root_real):
                    out.append(Candidate(path, source, rel, refused=ESCAPES_SOURCE))
                    continue
            if entry.is_dir(follow_symlinks=True):
                walk(path, (*rel, entry.name))
            elif entry.is_file(follow_symlinks=True):
                out.append(Candidate(path, source, rel))
            elif not entry.is_symlink():
                logger.debug("skipping %s (not a regular file)", path)
            else:
                out.append(Candidate(path, source, rel, refused=UNREADABLE))  # dangling link

    walk(source, (source.name,))
    return out
