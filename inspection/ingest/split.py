"""Group-aware, label-stratified train/val/test assignment that stays put when new images arrive.

Whole near-duplicate groups are assigned, so no part is seen on two sides of a split. Within each label
stratum, groups are taken in a seeded pseudo-random order (a hash of seed and group id, so the order of one
group never depends on the others) and each goes to the split furthest below its target share, counting the
images already assigned in earlier runs. Existing assignments are never moved.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _order_key(seed: int, group_id: str) -> str:
    return hashlib.sha256(f"{seed}:{group_id}".encode()).hexdigest()


def assign_splits(
    groups: Mapping[str, tuple[str | None, int]],
    fractions: tuple[float, float, float],
    seed: int,
    existing: Mapping[str, str] | None = None,
    existing_counts: Mapping[tuple[str | None, str], int] | None = None,
) -> dict[str, str]:
    """Split for each new group.

    groups: group_id -> (stratum label or None, number of images) for groups that need a split;
    existing: group_id -> split already fixed (returned unchanged); existing_counts: (label, split) -> images
    already in that split, so new groups top up the splits that are short.
    """
    existing = dict(existing or {})
    counts: Counter[tuple[str | None, str]] = Counter(existing_counts or {})
    out = dict(existing)
    by_stratum: dict[str | None, list[tuple[str, int]]] = {}
    for gid, (label, size) in groups.items():
        if gid in existing:
            continue
        by_stratum.setdefault(label, []).append((gid, size))
    for label, members in sorted(by_stratum.items(), key=lambda kv: str(kv[0])):
        members.sort(key=lambda m: _order_key(seed, m[0]))
        total = sum(counts[(label, s)] for s in SPLITS)
        for gid, size in members:
            total += size
            # deficit of each split against its share of the stratum once this group is in
            deficits = [fractions[i] * total - counts[(label, s)] for i, s in enumerate(SPLITS)]
            best = max(range(len(SPLITS)), key=lambda i: (deficits[i], -i))
            if fractions[best] <= 0:  # every split with a share is full: train takes the rest
                best = 0
            out[gid] = SPLITS[best]
            counts[(label, SPLITS[best])] += size
    return out
