"""The image index: one record per image (keyed by config digest), persisted as JSON.

Each record is `<root>/images/<config-hex>.json`, written atomically (temp,
fsync, rename, fsync dir) and loaded at start. Names are matched as strings:
the caller normalises references (`busybox` -> `docker.io/library/busybox:latest`)
before asking.

A repo tag belongs to exactly one image: recording an image with a tag moves
that tag away from whichever image held it (a re-pull of a moved tag); the
old image stays, possibly with no tags, until it is removed. Recording an
image that is already present merges its tags and digests.

Garbage collection support: `garbage(removed)` lists the blobs and chain ids
that the given (removed or replaced) records used and that no remaining image
uses; the service deletes those from the content and layer stores.

Thread-safety: mutations are serialised by a writer lock and swap the
in-memory maps under a short reader lock; readers always get copies.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri.errors import InvalidArgument, NotFound
from cri.fsutil import atomic_write_json, fsync_dir, read_json
from imageservice.content import parse_digest

log = logging.getLogger(__name__)

MIN_ID_PREFIX = 12  # shortest id prefix accepted (crictl prints 13 hex digits)
_HEX_PREFIX = re.compile(rf"(?:sha256:)?([0-9a-f]{{{MIN_ID_PREFIX},64}})")


def image_user(config: dict[str, Any]) -> tuple[int | None, str]:
    """(uid, username) from an OCI image config's `config.User`, the CRI way.

    "1000" -> (1000, ""); "app" -> (None, "app"); the group part of "u:g" is
    ignored; an empty user gives (None, "") (the kubelet then assumes root).
    """
    inner = config.get("config") if isinstance(config, dict) else None
    user = inner.get("User") if isinstance(inner, dict) else None
    if not isinstance(user, str) or not user:
        return None, ""
    name = user.split(":", 1)[0]
    try:
        return int(name, 10), ""
    except ValueError:
        return None, name


@dataclass
class ImageRecord:
    id: str  # config digest
    repo_tags: list[str]
    repo_digests: list[str]
    size: int  # unpacked bytes (sum of the layers' sizes)
    config: dict[str, Any]  # the parsed OCI image config
    manifest_digest: str  # the platform manifest
    chain_ids: list[str]  # bottom-most first
    diff_ids: list[str]
    layer_digests: list[str] = field(default_factory=list)  # compressed layer blobs
    layer_media_types: list[str] = field(default_factory=list)
    uid: int | None = None
    username: str = ""
    pinned: bool = False
    created_at: int = 0  # ns since the epoch, when first recorded here

    def __post_init__(self) -> None:
        if self.uid is None and not self.username:
            self.uid, self.username = image_user(self.config)
        if not self.created_at:
            self.created_at = time.time_ns()

    def blobs(self) -> set[str]:
        """Every content-store blob this image needs: config, manifests, layers."""
        out = {self.id, self.manifest_digest, *self.layer_digests}
        for ref in self.repo_digests:
            _, sep, digest = ref.rpartition("@")
            if sep:
                out.add(digest)  # the index or manifest that was pulled by that name
        return out

    def copy(self) -> ImageRecord:
        return dataclasses.replace(
            self,
            repo_tags=list(self.repo_tags),
            repo_digests=list(self.repo_digests),
            config=copy.deepcopy(self.config),
            chain_ids=list(self.chain_ids),
            diff_ids=list(self.diff_ids),
            layer_digests=list(self.layer_digests),
            layer_media_types=list(self.layer_media_types),
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        rec = cls(**{k: v for k, v in data.items() if k in names})
        parse_digest(rec.id)
        return rec


@dataclass(frozen=True)
class Garbage:
    blobs: list[str]
    chain_ids: list[str]


class ImageIndex:
    def __init__(self, root: Path | str) -> None:
        self.dir = Path(root) / "images"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._write_lock = threading.Lock()  # one mutation at a time (holds file I/O)
        self._lock = threading.Lock()  # guards the maps; never held across I/O
        self._images: dict[str, ImageRecord] = {}
        self._by_tag: dict[str, str] = {}
        self._by_digest: dict[str, str] = {}
        self._load()

    # -- reads -------------------------------------------------------------

    def get(self, ref: str) -> ImageRecord | None:
        """Find by id (`sha256:<hex>`, bare hex, or a unique prefix of >= 12 hex
        digits), by repo tag or by repo digest. None when nothing matches."""
        with self._lock:
            rec = self._find(ref)
            return rec.copy() if rec is not None else None

    def list(self, filter_ref: str | None = None) -> builtins.list[ImageRecord]:
        with self._lock:
            if filter_ref:
                rec = self._find(filter_ref)
                return [rec.copy()] if rec is not None else []
            return [r.copy() for r in self._images.values()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def referenced(self) -> tuple[set[str], set[str]]:
        """(blobs, chain ids) used by any image: the keep-set for start-up GC."""
        with self._lock:
            records = builtins.list(self._images.values())
        blobs: set[str] = set()
        chains: set[str] = set()
        for r in records:
            blobs |= r.blobs()
            chains.update(r.chain_ids)
        return blobs, chains

    def garbage(self, records: Iterable[ImageRecord]) -> Garbage:
        """What `records` used that no image in the index uses any more."""
        blobs: set[str] = set()
        chains: set[str] = set()
        for r in records:
            blobs |= r.blobs()
            chains.update(r.chain_ids)
        kept_blobs, kept_chains = self.referenced()
        return Garbage(sorted(blobs - kept_blobs), sorted(chains - kept_chains))

    # -- writes ------------------------------------------------------------

    def add_or_update(self, record: ImageRecord) -> ImageRecord:
        """Record an image; returns the stored (merged) record.

        Tags and digests are merged with an existing record of the same id and
        taken away from any other image that had them. The record's other
        fields replace the stored ones, except created_at (kept) and pinned
        (stays set once set).
        """
        parse_digest(record.id)
        parse_digest(record.manifest_digest)
        if len(record.chain_ids) != len(record.diff_ids):
            raise InvalidArgument(
                f"image {record.id}: {len(record.chain_ids)} chain ids "
                f"for {len(record.diff_ids)} diff ids"
            )
        with self._write_lock:
            with self._lock:
                old = self._images.get(record.id)
                merged = record.copy()
                if old is not None:
                    merged.repo_tags = _union(old.repo_tags, record.repo_tags)
                    merged.repo_digests = _union(old.repo_digests, record.repo_digests)
                    merged.created_at = old.created_at
                    merged.pinned = old.pinned or record.pinned
                losers: dict[str, ImageRecord] = {}
                for name in (*record.repo_tags, *record.repo_digests):
                    holder = self._by_tag.get(name) or self._by_digest.get(name)
                    if holder is None or holder == record.id:
                        continue
                    loser = losers.get(holder) or self._images[holder].copy()
                    loser.repo_tags = [t for t in loser.repo_tags if t != name]
                    loser.repo_digests = [d for d in loser.repo_digests if d != name]
                    losers[holder] = loser
                    log.info("moving %s from image %s to %s", name, holder, record.id)
            self._persist(merged)  # the new owner first: a crash between keeps the name
            for loser in losers.values():
                self._persist(loser)
            with self._lock:
                for r in (merged, *losers.values()):
                    self._put(r)
            return merged.copy()

    async def add_or_update_async(self, record: ImageRecord) -> ImageRecord:
        return await asyncio.to_thread(self.add_or_update, record)

    def remove(self, ref: str) -> ImageRecord:
        """Remove an image found by any reference; NotFound when there is none."""
        with self._write_lock:
            with self._lock:
                rec = self._find(ref)
            if rec is None:
                raise NotFound(f"image {ref!r} not found")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(rec.id))
            fsync_dir(self.dir)
            with self._lock:
                self._drop(rec.id)
            return rec.copy()

    async def remove_async(self, ref: str) -> ImageRecord:
        return await asyncio.to_thread(self.remove, ref)

    def untag(self, name: str) -> ImageRecord:
        """Take a repo tag or repo digest off its image (the image stays)."""
        with self._write_lock:
            with self._lock:
                holder = self._by_tag.get(name) or self._by_digest.get(name)
                if holder is None:
                    raise NotFound(f"no image has the name {name!r}")
                rec = self._images[holder].copy()
            rec.repo_tags = [t for t in rec.repo_tags if t != name]
            rec.repo_digests = [d for d in rec.repo_digests if d != name]
            self._persist(rec)
            with self._lock:
                self._put(rec)
            return rec.copy()

    # -- internals ---------------------------------------------------------

    def _find(self, ref: str) -> ImageRecord | None:
        """Caller holds self._lock."""
        if not ref:
            return None
        image_id = self._by_tag.get(ref) or self._by_digest.get(ref)
        if image_id is None:
            m = _HEX_PREFIX.fullmatch(ref)
            if m is None:
                return None
            prefix = "sha256:" + m.group(1)
            if prefix in self._images:
                image_id = prefix
            else:
                found = [i for i in self._images if i.startswith(prefix)]
                if len(found) != 1:
                    return None  # unknown or ambiguous
                image_id = found[0]
        return self._images.get(image_id)

    def _put(self, rec: ImageRecord) -> None:
        """Caller holds self._lock."""
        self._drop(rec.id)
        self._images[rec.id] = rec
        for t in rec.repo_tags:
            self._by_tag[t] = rec.id
        for d in rec.repo_digests:
            self._by_digest[d] = rec.id

    def _drop(self, image_id: str) -> None:
        """Caller holds self._lock."""
        old = self._images.pop(image_id, None)
        if old is None:
            return
        for t in old.repo_tags:
            if self._by_tag.get(t) == image_id:
                del self._by_tag[t]
        for d in old.repo_digests:
            if self._by_digest.get(d) == image_id:
                del self._by_digest[d]

    def _file(self, image_id: str) -> Path:
        return self.dir / f"{parse_digest(image_id)}.json"

    def _persist(self, rec: ImageRecord) -> None:
        atomic_write_json(self._file(rec.id), rec.to_json())

    def _load(self) -> None:
        loaded: builtins.list[tuple[int, ImageRecord]] = []
        for path in sorted(self.dir.iterdir()):
            if path.name.startswith("."):
                path.unlink()  # a temp file from an interrupted write
                continue
            if path.suffix != ".json":
                continue
            try:
                rec = ImageRecord.from_json(read_json(path))
                if path.name != f"{rec.id[7:]}.json":
                    raise ValueError(f"file holds image {rec.id}")
            except (OSError, ValueError, TypeError, KeyError, InvalidArgument) as exc:
                log.warning("skipping unreadable image record %s: %s", path, exc)
                continue
            loaded.append((path.stat().st_mtime_ns, rec))
        # Oldest first: if a crash left one name on two images, the newest write wins.
        loaded.sort(key=lambda item: item[0])
        for _, rec in loaded:
            for name in (*rec.repo_tags, *rec.repo_digests):
                holder = self._by_tag.get(name) or self._by_digest.get(name)
                if holder is not None and holder != rec.id:
                    stale = self._images[holder]
                    stale.repo_tags = [t for t in stale.repo_tags if t != name]
                    stale.repo_digests = [d for d in stale.repo_digests if d != name]
                    self._put(stale)
                    self._persist(stale)
            self._put(rec)
        log.debug("loaded %d image record(s) from %s", len(self._images), self.dir)


def _union(first: builtins.list[str], second: builtins.list[str]) -> builtins.list[str]:
    return builtins.list(dict.fromkeys([*first, *second]))
