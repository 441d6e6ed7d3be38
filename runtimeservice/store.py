"""A persisted, in-memory-indexed store of records (sandboxes, containers).

One JSON file per record under a directory. Records are frozen dataclasses:
metadata never changes after creation and status changes go through
`update()`, which writes the new version atomically (temp file, fsync,
rename) before the in-memory index sees it. A restart rebuilds the index from
the files (`load()`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar, get_type_hints

from cri.errors import NotFound
from cri.fsutil import atomic_write_json, read_json
from runtimeservice.filters import ids_matching

log = logging.getLogger(__name__)
R = TypeVar("R")


def to_jsonable(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        out[f.name] = value
    return out


def from_jsonable(cls: type[R], data: dict[str, Any]) -> R:
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue  # a field added later: its default applies
        value = data[f.name]
        tp = hints[f.name]
        if tp is bytes:
            value = base64.b64decode(value)
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            value = tp(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


class RecordStore(Generic[R]):
    """Records of one kind, keyed by their `id` attribute."""

    def __init__(self, directory: Path, cls: type[R], kind: str) -> None:
        self.dir = directory
        self.cls = cls
        self.kind = kind
        self._items: dict[str, R] = {}
        self._write_lock = threading.Lock()
        self._locks: dict[str, asyncio.Lock] = {}

    def load(self) -> list[R]:
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.dir.glob("*.json")):
            try:
                record = from_jsonable(self.cls, read_json(path))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable %s record %s: %s", self.kind, path, exc)
                continue
            self._items[record.id] = record  # type: ignore[attr-defined]
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return list(self._items.values())

    def _path(self, ident: str) -> Path:
        return self.dir / f"{ident}.json"

    def lock(self, ident: str) -> asyncio.Lock:
        """The per-record lock that serialises mutating calls on one object."""
        lock = self._locks.get(ident)
        if lock is None:
            lock = self._locks[ident] = asyncio.Lock()
        return lock

    def put(self, record: R) -> R:
        ident = record.id  # type: ignore[attr-defined]
        with self._write_lock:
            atomic_write_json(self._path(ident), to_jsonable(record))
            self._items[ident] = record
        return record

    def update(self, ident: str, **changes: Any) -> R:
        """The single way a record's status changes: write the new version, then publish it."""
        current = self.get(ident)
        return self.put(dataclasses.replace(current, **changes))  # type: ignore[type-var]

    def delete(self, ident: str) -> None:
        with self._write_lock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(ident))
            self._items.pop(ident, None)
        self._locks.pop(ident, None)

    def get(self, ident: str) -> R:
        try:
            return self._items[ident]
        except KeyError:
            raise NotFound(f"{self.kind} {ident!r} not found") from None

    def find(self, ident: str) -> R | None:
        return self._items.get(ident)

    def resolve(self, prefix: str) -> R:
        """The record whose id is `prefix` or uniquely starts with it."""
        if prefix in self._items:
            return self._items[prefix]
        found = ids_matching(prefix, self._items) if prefix else []
        if len(found) == 1:
            return self._items[found[0]]
        if len(found) > 1:
            raise NotFound(f"{self.kind} id prefix {prefix!r} is ambiguous")
        raise NotFound(f"{self.kind} {prefix!r} not found")

    def lookup(self, prefix: str) -> R | None:
        try:
            return self.resolve(prefix)
        except NotFound:
            return None

    def all(self) -> list[R]:
        return list(self._items.values())

    def select(self, pred: Callable[[R], bool]) -> Iterator[R]:
        return (r for r in self._items.values() if pred(r))

    def __len__(self) -> int:
        return len(self._items)
