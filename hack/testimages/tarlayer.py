"""Deterministic layer tarballs: entries in, identical bytes out on every run.

Every header gets the same mtime, empty user/group names and the entry's own
uid/gid/mode, so the digest of a layer depends only on what it contains. PAX
format is used so that xattrs (``SCHILY.xattr.*``) can be carried.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import zstandard

# 2000-01-01T00:00:00Z: a fixed, non-zero mtime for every entry.
FIXED_MTIME = 946684800
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


class EntryType(Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


class Compression(Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_TAR_TYPES = {
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.HARDLINK: tarfile.LNKTYPE,
    EntryType.CHAR: tarfile.CHRTYPE,
    EntryType.BLOCK: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}


@dataclass(frozen=True)
class Entry:
    """One tar member. ``path`` is the archive name (normally without a leading '/')."""

    path: str
    type: EntryType = EntryType.FILE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    linkname: str = ""
    xattrs: dict[str, str] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0

    @property
    def is_whiteout(self) -> bool:
        return self.path.rstrip("/").rsplit("/", 1)[-1].startswith(WHITEOUT_PREFIX)


def file(path: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0,
         xattrs: dict[str, str] | None = None) -> Entry:
    raw = data.encode() if isinstance(data, str) else data
    return Entry(path, EntryType.FILE, mode, uid, gid, raw, xattrs=dict(xattrs or {}))


def directory(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, EntryType.DIR, mode, uid, gid)


def symlink(path: str, target: str, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, EntryType.SYMLINK, 0o777, uid, gid, linkname=target)


def hardlink(path: str, target: str) -> Entry:
    """A hard link to ``target``, an archive name of a file earlier in the same layer."""
    return Entry(path, EntryType.HARDLINK, 0o644, linkname=target)


def chardev(path: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry(path, EntryType.CHAR, mode, devmajor=major, devminor=minor)


def whiteout(path: str) -> Entry:
    """Delete ``path`` (file or directory) of the lower layers."""
    parent, _, name = path.rstrip("/").rpartition("/")
    wh = f"{WHITEOUT_PREFIX}{name}"
    return Entry(f"{parent}/{wh}" if parent else wh)


def opaque(dir_path: str) -> Entry:
    """Hide everything the lower layers put in ``dir_path``."""
    return Entry(f"{dir_path.rstrip('/')}/{OPAQUE_MARKER}")


def _tarinfo(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.type = _TAR_TYPES[entry.type]
    info.mode = entry.mode
    info.uid = entry.uid
    info.gid = entry.gid
    info.uname = ""
    info.gname = ""
    info.mtime = FIXED_MTIME
    info.linkname = entry.linkname
    info.size = len(entry.data) if entry.type is EntryType.FILE else 0
    if entry.type in (EntryType.CHAR, EntryType.BLOCK):
        info.devmajor = entry.devmajor
        info.devminor = entry.devminor
    if entry.xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in sorted(entry.xattrs.items())}
    return info


def build_tar(entries: Iterable[Entry]) -> bytes:
    """The uncompressed layer tarball for ``entries``, in the order given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = _tarinfo(entry)
            payload = io.BytesIO(entry.data) if info.size else None
            tar.addfile(info, payload)
    return buf.getvalue()


def compress(data: bytes, compression: Compression, level: int | None = None) -> bytes:
    """Compress deterministically (gzip header mtime 0; zstd with the content size)."""
    if compression is Compression.NONE:
        return data
    if compression is Compression.GZIP:
        return gzip.compress(data, compresslevel=6 if level is None else level, mtime=0)
    cctx = zstandard.ZstdCompressor(level=3 if level is None else level, write_content_size=True)
    return bytes(cctx.compress(data))


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
