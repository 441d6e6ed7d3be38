"""Content-addressed blob store: `<root>/blobs/sha256/<hex>`, verified on the way in.

Blobs (manifests, configs, compressed layers) arrive through an `Ingest`: a
temp file under `<root>/tmp/` that the caller streams into. `commit()` checks
the size and the sha256, fsyncs the file, renames it into place and fsyncs the
directory, so a blob is either entirely present under `blobs/` or absent;
nothing partial is ever visible there. A blob is immutable once committed.

In-flight pulls take a *lease* on the digests they are about to use; `delete`
keeps leased blobs, so a concurrent RemoveImage cannot collect a blob that a
pull has checked for and is about to record.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from cri.errors import FailedPrecondition, InvalidArgument, NotFound
from cri.fsutil import fsync_dir

log = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
INGEST_PREFIX = "ingest-"


class ContentMismatch(InvalidArgument):
    """Streamed content does not have the size or the digest it was announced with."""


def parse_digest(digest: str) -> str:
    """Return the hex part of `sha256:<64 lowercase hex>`; anything else is InvalidArgument."""
    if not isinstance(digest, str):
        raise InvalidArgument(f"invalid digest {digest!r}: expected a string 'sha256:<hex>'")
    algo, sep, hexpart = digest.partition(":")
    if not sep:
        raise InvalidArgument(f"invalid digest {digest!r}: expected 'sha256:<64 hex digits>'")
    if algo != "sha256":
        raise InvalidArgument(
            f"unsupported digest algorithm {algo!r} in {digest!r}: only sha256 is supported"
        )
    if not _HEX64.fullmatch(hexpart):
        raise InvalidArgument(
            f"invalid digest {digest!r}: expected 64 lowercase hex digits after 'sha256:'"
        )
    return hexpart


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Ingest:
    """A blob being written: a file-like sink that hashes what it is given.

    Use as a context manager (an exception inside aborts) or call `commit()` /
    `abort()` explicitly. Writing more than the expected size fails at once.
    """

    def __init__(
        self, store: ContentStore, digest: str, expected_size: int | None, tmp: Path, fd: int
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self._store = store
        self._tmp = tmp
        self._fh: BinaryIO | None = os.fdopen(fd, "wb", buffering=1 << 20)
        self._hash = hashlib.sha256()
        self._written = 0
        self._finished = False  # committed or aborted: the temp name is no longer ours

    @property
    def written(self) -> int:
        return self._written

    @property
    def closed(self) -> bool:
        return self._fh is None

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        fh = self._require_open()
        n = len(data)
        if self.expected_size is not None and self._written + n > self.expected_size:
            self.abort()
            raise ContentMismatch(
                f"blob {self.digest}: received more than the expected {self.expected_size} bytes"
            )
        fh.write(data)
        self._hash.update(data)
        self._written += n
        return n

    def flush(self) -> None:
        self._require_open().flush()

    def commit(self) -> Path:
        """Verify, fsync and move the blob into place; returns its final path."""
        fh = self._require_open()
        try:
            fh.flush()
            os.fsync(fh.fileno())
        except BaseException:
            self.abort()
            raise
        fh.close()
        self._fh = None
        self._finished = True
        try:
            if self.expected_size is not None and self._written != self.expected_size:
                raise ContentMismatch(
                    f"blob {self.digest}: size {self._written} bytes, expected {self.expected_size}"
                )
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self.digest:
                raise ContentMismatch(f"blob {self.digest}: content has digest {actual}")
            final = self._store.path(self.digest)
            if final.exists():
                self._tmp.unlink()  # same content already committed (a concurrent ingest)
            else:
                os.chmod(self._tmp, 0o644)
                os.replace(self._tmp, final)
                fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            raise
        return final

    async def commit_async(self) -> Path:
        return await asyncio.to_thread(self.commit)

    def abort(self) -> None:
        """Drop the temp file; safe to call more than once, and a no-op after commit()."""
        if self._finished:
            return
        self._finished = True
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def _require_open(self) -> BinaryIO:
        if self._fh is None:
            raise FailedPrecondition(f"ingest of {self.digest} is already committed or aborted")
        return self._fh

    def __enter__(self) -> Ingest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An ingest that was neither committed nor aborted is dropped, too.
        self.abort()


class ContentStore:
    """Blobs under `<root>/blobs/sha256/`, temp files under `<root>/tmp/`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.root / "blobs", self.blob_dir, self.tmp_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}

    # -- lookups ---------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Where the blob lives (whether or not it is present)."""
        return self.blob_dir / parse_digest(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        try:
            return self.path(digest).open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the content store") from None

    def read_bytes(self, digest: str) -> bytes:
        with self.open(digest) as fh:
            return fh.read()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the content store") from None

    def digests(self) -> list[str]:
        """Every committed blob (for start-up garbage collection)."""
        with os.scandir(self.blob_dir) as it:
            return sorted(
                "sha256:" + e.name for e in it if _HEX64.fullmatch(e.name) and e.is_file()
            )

    # -- writes ----------------------------------------------------------

    def ingest(self, expected_digest: str, expected_size: int | None = None) -> Ingest:
        """Start writing a blob; the caller streams into the returned Ingest."""
        hexd = parse_digest(expected_digest)
        if expected_size is not None and expected_size < 0:
            raise InvalidArgument(f"blob {expected_digest}: invalid size {expected_size}")
        fd, tmp = tempfile.mkstemp(prefix=f"{INGEST_PREFIX}{hexd[:16]}-", dir=self.tmp_dir)
        return Ingest(self, expected_digest, expected_size, Path(tmp), fd)

    def write_bytes(self, digest: str, data: bytes) -> Path:
        """Store a small blob (manifest, config), verified like any ingest."""
        if self.has(digest):
            actual = sha256_digest(data)
            if actual != digest:
                raise ContentMismatch(f"blob {digest}: content has digest {actual}")
            return self.path(digest)
        with self.ingest(digest, len(data)) as ing:
            ing.write(data)
            return ing.commit()

    async def write_bytes_async(self, digest: str, data: bytes) -> Path:
        return await asyncio.to_thread(self.write_bytes, digest, data)

    def delete(self, digest: str) -> bool:
        """Remove a blob; returns False when it was absent or is leased (then it stays)."""
        path = self.path(digest)
        with self._lock:
            if self._leases.get(digest):
                log.debug("blob %s is leased by a pull in progress; keeping it", digest)
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                return False
        fsync_dir(self.blob_dir)
        return True

    # -- leases ----------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep `digests` from being deleted while the block runs (they need not exist yet)."""
        held = list(dict.fromkeys(digests))
        for d in held:
            parse_digest(d)
        with self._lock:
            for d in held:
                self._leases[d] = self._leases.get(d, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for d in held:
                    left = self._leases[d] - 1
                    if left:
                        self._leases[d] = left
                    else:
                        del self._leases[d]

    def leased(self, digest: str) -> bool:
        with self._lock:
            return bool(self._leases.get(digest))

    # -- housekeeping ----------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) used by committed blobs (apparent sizes)."""
        total = count = 0
        with os.scandir(self.blob_dir) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    total += e.stat(follow_symlinks=False).st_size
                    count += 1
        return total, count

    async def usage_async(self) -> tuple[int, int]:
        return await asyncio.to_thread(self.usage)

    def cleanup_tmp(self) -> int:
        """Remove leftover ingest temp files (call at start, before any pull); returns count."""
        removed = 0
        with os.scandir(self.tmp_dir) as it:
            for e in it:
                if e.name.startswith(INGEST_PREFIX) and not e.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
                        removed += 1
        if removed:
            log.info("removed %d unfinished blob download(s) from %s", removed, self.tmp_dir)
        return removed
