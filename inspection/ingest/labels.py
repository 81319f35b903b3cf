"""Label values and defect-type names shared by ingest, the manifest and the review app (no torch).

A label-map value is `ok`, `defect`, or `defect:<type>` (the folder holds defective parts of that type, e.g.
`crack: "defect:crack"`). Type names are short lower-case slugs so they work as folder names, keys in a model
card and values of the decision store's `String(32)` columns alike.
"""

from __future__ import annotations

import re

from inspection.schemas import DEFECT_TYPE_PATTERN

LABELS = ("ok", "defect")
TYPED_PREFIX = "defect:"
_TYPE_NAME = re.compile(DEFECT_TYPE_PATTERN)
TYPE_NAME_RULE = "lower-case letters, digits, '_' or '-', starting with a letter or digit, at most 32 characters"
# words the labels and the review statistics use themselves (a type 'ok' or 'none' would read as their opposite)
RESERVED_TYPES = ("ok", "defect", "none", "unspecified")


def type_name_problem(name: object) -> str | None:
    """Why `name` cannot be a defect type (None when it can)."""
    if not isinstance(name, str) or not _TYPE_NAME.match(name):
        return f"defect type {name!r} is not a valid name; use {TYPE_NAME_RULE}"
    if name in RESERVED_TYPES:
        return f"defect type {name!r} is reserved ({', '.join(RESERVED_TYPES)}); name the defect itself"
    return None


def parse_label(value: str | None) -> tuple[str | None, str | None]:
    """A label-map value -> (label, defect type): 'ok' -> ('ok', None), 'defect:crack' -> ('defect', 'crack').

    None (a folder the map does not name) is (None, None). Raises ValueError for anything else.
    """
    if value is None:
        return None, None
    if value in LABELS:
        return value, None
    if isinstance(value, str) and value.startswith(TYPED_PREFIX):
        name = value[len(TYPED_PREFIX) :]
        problem = type_name_problem(name)
        if problem:
            raise ValueError(f"{value!r}: {problem}")
        return "defect", name
    raise ValueError(f"{value!r} is not a label; allowed: ok, defect, or defect:<type> (e.g. defect:crack)")
