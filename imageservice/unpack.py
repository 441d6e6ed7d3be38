"""Unpack one layer blob into a directory that overlayfs can use as a lowerdir.

The blob (gzip, zstd or plain tar: the magic bytes decide; the media type only
has to name a layer type) is decompressed and hashed in a helper thread, so
that decompression overlaps with file writes (zlib, zstd and sha256 release
the GIL). The uncompressed stream, end-of-archive padding included, must hash
to the layer's diff id; otherwise the destination is removed and LayerError
raised. `tarfile` parses the headers over a forward-only seekable view of the
stream (its own stream mode re-copies its buffer on every header read), and
file data is copied straight from that view in 1 MiB chunks.

What gets written, and how it stays inside the destination, is the business
of `layertree.TreeWriter` (whiteouts as overlay markers, no symlink is ever
followed). Any failure removes the destination.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import logging
import os
import queue
import shutil
import stat
import tarfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol, cast

import zstandard

from cri.errors import FailedPrecondition, InvalidArgument
from imageservice.content import parse_digest
from imageservice.layertree import LayerError, TreeWriter, os_error

__all__ = [
    "LAYER_MEDIA_TYPES",
    "LayerError",
    "UnpackResult",
    "remove_tree",
    "unpack_layer",
    "unpack_layer_async",
]

log = logging.getLogger(__name__)

LAYER_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class UnpackResult:
    size: int  # apparent bytes of regular files, each inode once
    inodes: int  # every inode in the tree, the root directory included


def unpack_layer(
    blob_path: Path | str, media_type: str, dest_dir: Path | str, expected_diff_id: str
) -> UnpackResult:
    """Unpack a layer blob into `dest_dir` (created here; must not exist).

    Raises LayerError for bad content (dest removed), ResourceExhausted when
    the disk is full, Internal for other host-side failures.
    """
    parse_digest(expected_diff_id)
    if media_type not in LAYER_MEDIA_TYPES:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}")
    dest = Path(dest_dir)
    try:
        os.mkdir(dest, 0o755)
    except FileExistsError:
        raise FailedPrecondition(f"unpack destination {dest} already exists") from None
    try:
        os.chmod(dest, 0o755)
        with open(blob_path, "rb") as raw:
            return _unpack(raw, str(blob_path), dest, expected_diff_id)
    except BaseException as exc:
        remove_tree(dest)
        if isinstance(exc, OSError):
            raise os_error(exc, f"unpacking {blob_path}") from exc
        raise


async def unpack_layer_async(
    blob_path: Path | str, media_type: str, dest_dir: Path | str, expected_diff_id: str
) -> UnpackResult:
    return await asyncio.to_thread(unpack_layer, blob_path, media_type, dest_dir, expected_diff_id)


def remove_tree(path: Path | str) -> None:
    """rm -rf that never follows symlinks and copes with read-only dirs when unprivileged."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        return
    if os.path.islink(p) or not os.path.isdir(p):
        os.unlink(p)
        return
    if os.geteuid() != 0:
        os.chmod(p, 0o700)
        for top, dirs, _files in os.walk(p):
            for d in dirs:
                sub = os.path.join(top, d)
                if not os.path.islink(sub):
                    os.chmod(sub, 0o700)
    shutil.rmtree(p)


# -- decompression + hashing ------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Prefetcher:
    """Decompresses and hashes ahead in a thread while the caller writes files.

    zlib, zstd and sha256 release the GIL, so on two cores decompression
    overlaps with the file writes. `read` returns one chunk (b"" at the end).
    """

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self.hash = hashlib.sha256()
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=8)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="layer-decompress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._inner.read(_CHUNK)
                self.hash.update(data)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # handed to the reading thread
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1, /) -> bytes:
        if self._eof:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _TarSource:
    """The decompressed stream as a forward-only seekable file.

    tarfile's own stream mode re-copies its whole read buffer on each 512-byte
    header read; this keeps one buffer with an offset instead, and hands
    large file reads straight through.
    """

    def __init__(self, inner: _Readable) -> None:
        self._inner = inner
        self.count = 0  # bytes pulled from the decompressor
        self._buf = b""
        self._off = 0
        self._pos = 0  # logical position of the next byte handed out

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET:
            raise OSError(errno.ESPIPE, "layer stream can only seek forward")
        if pos < self._pos:
            raise OSError(errno.ESPIPE, f"layer stream cannot seek back to {pos}")
        while self._pos < pos:
            if not self.read_some(min(pos - self._pos, _CHUNK)):
                break  # past the end: tarfile notices at its next read
        return self._pos

    def _pull(self) -> bool:
        data = self._inner.read(_CHUNK)
        if not data:
            return False
        self.count += len(data)
        rest = len(self._buf) - self._off
        self._buf = self._buf[self._off :] + data if rest else data
        self._off = 0
        return True

    def read_some(self, n: int) -> bytes:
        """Up to n bytes (fewer only at a buffer boundary or the end)."""
        if self._off >= len(self._buf) and not self._pull():
            return b""
        data = self._buf[self._off : self._off + n]
        self._off += len(data)
        self._pos += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        """Exactly n bytes unless the stream ends (what tarfile expects)."""
        if n is None or n < 0:
            n = 1 << 62
        first = self.read_some(n)
        if len(first) == n or not first:
            return first
        parts = [first]
        got = len(first)
        while got < n and (more := self.read_some(n - got)):
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def drain(self) -> None:
        """Consume what tarfile left unread (end-of-archive blocks, record padding)."""
        self._buf, self._off = b"", 0
        while self._pull():
            self._buf, self._off = b"", 0


def _decompressed(raw: BinaryIO) -> _Readable:
    magic = raw.read(4)
    raw.seek(0)
    if magic[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # handles multi-member streams
    if magic == _ZSTD_MAGIC:
        reader: _Readable = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=_CHUNK, read_across_frames=True
        )
        return reader
    return raw


def _unpack(raw: BinaryIO, blob: str, dest: Path, diff_id: str) -> UnpackResult:
    prefetch = _Prefetcher(_decompressed(raw))
    src = _TarSource(prefetch)
    root_fd = os.open(dest, _DIR_FLAGS)
    applier = TreeWriter(root_fd, src)
    try:
        try:
            # Plain TarFile over the forward-only source: tarfile only ever seeks ahead.
            tf = tarfile.TarFile(fileobj=cast(IO[bytes], src), mode="r")
        except tarfile.ReadError as exc:
            if src.count != 0:
                raise
            log.debug("layer %s is empty (%s)", blob, exc)
        else:
            with tf:
                while (member := tf.next()) is not None:
                    applier.apply(tf, member)
                    # TarFile would otherwise keep every header in memory.
                    tf.members.clear()  # type: ignore[attr-defined]
        src.drain()
        actual = "sha256:" + prefetch.hash.hexdigest()  # the thread has hashed all by now
        if actual != diff_id:
            raise LayerError(
                f"layer {blob}: uncompressed content has digest {actual}, "
                f"expected diff id {diff_id}"
            )
        result = _measure(dest)
        applier.finish()
        return result
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as exc:
        raise LayerError(f"layer {blob} is not a valid (compressed) tar archive: {exc}") from exc
    finally:
        applier.close()
        prefetch.close()
        os.close(root_fd)


def _measure(root: Path) -> UnpackResult:
    size, inodes = 0, 1
    seen: set[int] = set()
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                inodes += 1
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
                elif stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return UnpackResult(size=size, inodes=inodes)
