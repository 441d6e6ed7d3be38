"""Unpacked layers, one directory per chain id, ready to be overlayfs lowerdirs.

Layout under the image root::

    layers/<chainid-hex>/diff/       the layer's tree (whiteouts as overlay markers)
    layers/<chainid-hex>/meta.json   LayerMeta: diff id, parent chain id, size, inodes
    tmp/unpack-*                     layers being unpacked (renamed into place when done)
    tmp/remove-*                     layers being deleted (renamed out first)

A layer appears under `layers/` in one rename, meta.json included, and leaves
in one rename, so `has()` never sees half a layer. The chain id (not the diff
id) names the directory, as the OCI image spec defines it:
chainid(L0) = diffid(L0); chainid(Ln) = sha256(chainid(Ln-1) + " " + diffid(Ln)).

Concurrent `add`s of one chain id: the first unpacks, the others wait on a
per-chain lock and reuse its result. Pulls *lease* the chain ids they are
about to record; `remove` keeps leased layers. Which layers are garbage is
the image index's business (ImageIndex.garbage); this store only deletes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri.errors import NotFound
from cri.fsutil import atomic_write_json, fsync_dir, read_json
from imageservice.content import parse_digest
from imageservice.unpack import remove_tree, unpack_layer

log = logging.getLogger(__name__)

UNPACK_PREFIX = "unpack-"
REMOVE_PREFIX = "remove-"


def chain_id(parent: str | None, diff_id: str) -> str:
    """The chain id of a layer with diff id `diff_id` on top of chain `parent`."""
    parse_digest(diff_id)
    if parent is None:
        return diff_id
    parse_digest(parent)
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """Chain ids of every layer of an image, bottom-most first (like the diff ids)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(chain_id(out[-1] if out else None, d))
    return out


@dataclass(frozen=True)
class LayerMeta:
    chain_id: str
    diff_id: str
    parent: str | None  # chain id of the layer below, None for a base layer
    size: int  # apparent bytes of regular files
    inodes: int
    created_at: int  # ns since the epoch

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerMeta:
        return cls(
            chain_id=str(data["chain_id"]),
            diff_id=str(data["diff_id"]),
            parent=None if data.get("parent") is None else str(data["parent"]),
            size=int(data["size"]),
            inodes=int(data["inodes"]),
            created_at=int(data.get("created_at", 0)),
        )


class LayerStore:
    def __init__(self, root: Path | str, sync: bool = True) -> None:
        """Open (and load) the store under `root`; `sync=False` skips syncfs (tests)."""
        self.root = Path(root)
        self.layer_dir = self.root / "layers"
        self.tmp_dir = self.root / "tmp"
        self.sync = sync
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.layer_dir.mkdir(mode=0o711, exist_ok=True)
        self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()  # guards the dicts below, never held across I/O
        self._layers: dict[str, LayerMeta] = {}
        self._key_locks: dict[str, threading.Lock] = {}
        self._leases: dict[str, int] = {}
        self._load()

    # -- lookups ---------------------------------------------------------

    def has(self, chain: str) -> bool:
        with self._lock:
            return chain in self._layers

    def get(self, chain: str) -> LayerMeta | None:
        with self._lock:
            return self._layers.get(chain)

    def all(self) -> list[LayerMeta]:
        with self._lock:
            return list(self._layers.values())

    def diff_path(self, chain: str) -> Path:
        if not self.has(chain):
            raise NotFound(f"layer {chain} is not unpacked")
        return self._dir(chain) / "diff"

    def lowerdirs(self, chains: Sequence[str]) -> list[Path]:
        """Diff dirs for an image's chain ids (given bottom-most first), top-most first."""
        with self._lock:
            missing = [c for c in chains if c not in self._layers]
        if missing:
            raise NotFound(f"layer {missing[0]} is not unpacked")
        return [self._dir(c) / "diff" for c in reversed(chains)]

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) of all unpacked layers, from their recorded sizes."""
        with self._lock:
            metas = list(self._layers.values())
        return sum(m.size for m in metas), sum(m.inodes for m in metas)

    # -- add -------------------------------------------------------------

    def add(
        self, parent: str | None, diff_id: str, blob_path: Path | str, media_type: str
    ) -> LayerMeta:
        """Unpack a layer blob on top of chain `parent`, unless it is already there.

        Blocking (decompression and disk writes): use add_async from the loop.
        """
        chain = chain_id(parent, diff_id)
        if parent is not None and not self.has(parent):
            raise NotFound(f"parent layer {parent} of {chain} is not unpacked")
        with self._key_lock(chain):
            existing = self.get(chain)
            if existing is not None:
                return existing
            work = Path(tempfile.mkdtemp(prefix=f"{UNPACK_PREFIX}{chain[7:19]}-", dir=self.tmp_dir))
            try:
                t0 = time.monotonic()
                result = unpack_layer(blob_path, media_type, work / "diff", diff_id)
                meta = LayerMeta(chain, diff_id, parent, result.size, result.inodes, time.time_ns())
                atomic_write_json(work / "meta.json", meta.to_json(), durable=False)
                os.chmod(work, 0o755)
                if self.sync:
                    _syncfs(work)
                final = self._dir(chain)
                try:
                    os.rename(work, final)
                except OSError:
                    if not (final / "meta.json").is_file():
                        raise
                    # Another process put it there first: use theirs.
                    remove_tree(work)
                    meta = LayerMeta.from_json(read_json(final / "meta.json"))
                else:
                    fsync_dir(self.layer_dir)
                    log.info(
                        "unpacked layer %s (%d bytes, %d inodes) in %.2fs",
                        chain,
                        meta.size,
                        meta.inodes,
                        time.monotonic() - t0,
                    )
            except BaseException:
                remove_tree(work)
                raise
            with self._lock:
                self._layers[chain] = meta
            return meta

    async def add_async(
        self, parent: str | None, diff_id: str, blob_path: Path | str, media_type: str
    ) -> LayerMeta:
        return await asyncio.to_thread(self.add, parent, diff_id, blob_path, media_type)

    # -- remove ----------------------------------------------------------

    def remove(self, chain: str) -> bool:
        """Delete an unpacked layer; False when it is absent or leased (then it stays)."""
        parse_digest(chain)
        with self._key_lock(chain):
            with self._lock:
                if chain not in self._layers:
                    return False
                if self._leases.get(chain):
                    log.debug("layer %s is leased by a pull in progress; keeping it", chain)
                    return False
                meta = self._layers.pop(chain)
            try:
                prefix = f"{REMOVE_PREFIX}{chain[7:19]}-"
                doomed = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._dir(chain), doomed / "layer")
                    fsync_dir(self.layer_dir)
            except BaseException:
                with self._lock:
                    self._layers[chain] = meta
                raise
        remove_tree(doomed)
        log.info("removed layer %s", chain)
        return True

    async def remove_async(self, chain: str) -> bool:
        return await asyncio.to_thread(self.remove, chain)

    # -- leases ----------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, chains: Iterable[str]) -> Iterator[None]:
        """Keep these chain ids from being removed while the block runs."""
        held = list(dict.fromkeys(chains))
        with self._lock:
            for c in held:
                self._leases[c] = self._leases.get(c, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for c in held:
                    left = self._leases[c] - 1
                    if left:
                        self._leases[c] = left
                    else:
                        del self._leases[c]

    def leased(self, chain: str) -> bool:
        with self._lock:
            return bool(self._leases.get(chain))

    # -- start-up ----------------------------------------------------------

    def cleanup_tmp(self) -> int:
        """Remove unfinished unpacks and removals (call at start); returns count."""
        removed = 0
        with os.scandir(self.tmp_dir) as it:
            for e in it:
                if e.name.startswith((UNPACK_PREFIX, REMOVE_PREFIX)):
                    remove_tree(e.path)
                    removed += 1
        if removed:
            log.info("removed %d unfinished layer operation(s) from %s", removed, self.tmp_dir)
        return removed

    def _load(self) -> None:
        with os.scandir(self.layer_dir) as it:
            entries = [e.name for e in it]
        for name in entries:
            path = self.layer_dir / name
            try:
                meta = LayerMeta.from_json(read_json(path / "meta.json"))
                if meta.chain_id != "sha256:" + name or not (path / "diff").is_dir():
                    raise ValueError(f"meta.json names {meta.chain_id}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unusable layer directory %s: %s", path, exc)
                doomed = Path(tempfile.mkdtemp(prefix=REMOVE_PREFIX, dir=self.tmp_dir))
                os.rename(path, doomed / "layer")
                remove_tree(doomed)
                continue
            self._layers[meta.chain_id] = meta

    # -- helpers -----------------------------------------------------------

    def _dir(self, chain: str) -> Path:
        return self.layer_dir / parse_digest(chain)

    def _key_lock(self, chain: str) -> threading.Lock:
        with self._lock:
            lock = self._key_locks.get(chain)
            if lock is None:
                lock = self._key_locks[chain] = threading.Lock()
            return lock


def _syncfs(path: Path) -> None:
    """Flush the filesystem holding `path` before the layer becomes visible."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc_syncfs is None or _libc_syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _load_syncfs() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_libc_syncfs = _load_syncfs()
