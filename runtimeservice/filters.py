"""The filters that List* calls share: id (a unique prefix is enough), labels."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every key of the selector is present in labels with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())


def ids_matching(prefix: str, ids: Iterable[str]) -> list[str]:
    """Ids that start with `prefix` (all of them for an empty prefix)."""
    return [i for i in ids if i.startswith(prefix)]


def resolve_id(prefix: str, ids: Iterable[str]) -> str | None:
    """The one id starting with `prefix`, or None when none or several do."""
    found = ids_matching(prefix, ids) if prefix else []
    return found[0] if len(found) == 1 else None
