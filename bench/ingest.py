"""Benchmark: ingest a folder (default $INSPECTION_REAL_DATA) into a temporary store and print JSON figures.

nice .venv/bin/python bench/ingest.py [FOLDER] [--workers N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from inspection.config import load_config
from inspection.ingest import IngestConfig, load_samples, run_ingest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", nargs="?", default=os.environ.get("INSPECTION_REAL_DATA"))
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args()
    if not args.folder:
        print("no folder given and INSPECTION_REAL_DATA is unset", file=sys.stderr)
        return 2
    config = load_config(IngestConfig, None, ["progress=false", *args.overrides])
    n_files = sum(1 for p in Path(args.folder).rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run_ingest(config, [Path(args.folder)], Path(tmp) / "store")
        wall = time.perf_counter() - t0
        labels_of_group: dict[str, set] = {}
        for sample in load_samples(Path(tmp) / "store"):
            labels_of_group.setdefault(sample.group_id, set()).add(sample.label)
        t1 = time.perf_counter()
        rerun = run_ingest(config, [Path(args.folder)], Path(tmp) / "store")
        rerun_wall = time.perf_counter() - t1
    out = {
        "folder": str(args.folder),
        "n_files": n_files,
        "accepted": result.accepted,
        "duplicates": result.duplicates,
        "quarantined": result.quarantined,
        "near_duplicate_groups": result.groups,
        "groups_with_copies": sum(n for size, n in result.group_sizes.items() if size > 1),
        "largest_group": max(result.group_sizes) if result.group_sizes else 0,
        "singletons": result.group_sizes.get(1, 0),
        "images_in_groups_with_copies": sum(size * n for size, n in result.group_sizes.items() if size > 1),
        "groups_with_both_labels": sum(1 for labels in labels_of_group.values() if len(labels) > 1),
        "group_size_histogram": result.group_sizes,
        "split_counts": result.split_counts,
        "wall_s": round(wall, 2),
        "images_per_s": round(n_files / wall, 1) if wall else None,
        "rerun_wall_s": round(rerun_wall, 2),
        "rerun_added": rerun.accepted,
        "workers": config.workers or os.cpu_count(),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
