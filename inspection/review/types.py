"""Which defect types the review form offers, and how a type is shown.

A plant names its own types (folders `crack/`, `cold_shut/` mapped to `defect:<type>` at ingest), a typed model
answers those names, and QA has a fixed vocabulary (`schemas.DefectType`). They meet in the form: the part's
model's own types come first (from its model card in the registry when `review.registry` is set, else the types
the decision store holds as that model version's predictions), then QA's enum values the model does not have.
So QA can confirm or correct the model's type in the model's own words, and still name an enum type the model
does not know yet (the next retrain learns it once two parts carry it). The type QA confirms is stored as given
and flows back to the training manifest as the image's type (`queries.reviewed_labels`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy import select

from inspection.decisions import DecisionStore, inspections
from inspection.review.queries import ENUM_TYPES
from inspection.schemas import ModelCard

logger = logging.getLogger(__name__)

_ENUM_LABELS = {"burr_flash": "burr/flash"}  # QA's established spelling


def type_label(value: str | None) -> str:
    """A type as the pages show it: 'burr_flash' -> 'burr/flash', 'cold_shut' -> 'cold shut'."""
    if not value:
        return ""
    return _ENUM_LABELS.get(value, value.replace("_", " "))


class TypeChoices:
    """The form's type choices per model version. Card lookups are cached: a registered version never changes."""

    def __init__(self, store: DecisionStore, registry: str | Path | None = None):
        self.store = store
        self.registry = Path(registry) if registry else None
        self._cards: dict[str, tuple[str, ...]] = {}
        self._lock = threading.Lock()

    def card_types(self, model_version: str | None) -> tuple[str, ...]:
        """`defect_types` of the version's model card in the registry; () when unknown or no registry."""
        if self.registry is None or not model_version or "/" in model_version or model_version.startswith("."):
            return ()
        with self._lock:
            if model_version not in self._cards:
                path = self.registry / "versions" / model_version / "model_card.json"
                try:
                    # read the card alone: the model file's checksum is the runner's business, not the form's
                    self._cards[model_version] = tuple(ModelCard.model_validate_json(path.read_text()).defect_types)
                except FileNotFoundError:
                    self._cards[model_version] = ()
                except (OSError, ValueError) as exc:
                    logger.warning(
                        "model card of %s in %s is unreadable (%s); types from the store",
                        model_version,
                        self.registry,
                        exc,
                    )
                    self._cards[model_version] = ()
            return self._cards[model_version]

    def model_types(self, model_version: str | None) -> list[str]:
        """The version's own types: its card's (in the card's order), else those it answered in the store."""
        card = self.card_types(model_version)
        if card:
            return list(card)
        if not model_version:
            return []
        stmt = (
            select(inspections.c.defect_type)
            .where(inspections.c.model_version == model_version, inspections.c.defect_type.is_not(None))
            .distinct()
        )
        with self.store.engine.connect() as conn:
            return sorted(conn.execute(stmt).scalars())

    def for_version(self, model_version: str | None, *also: str | None) -> list[tuple[str, str]]:
        """(value, label) choices: the model's types, then QA's enum, then `also` (e.g. the current decision's
        type, made on another model's terms) when missing."""
        values: list[str] = []
        for value in (*self.model_types(model_version), *ENUM_TYPES, *also):
            if value and value not in values:
                values.append(value)
        return [(v, type_label(v)) for v in values]
