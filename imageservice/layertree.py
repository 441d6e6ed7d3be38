"""Write tar members beneath a directory, overlayfs style, never outside it.

`TreeWriter` applies the members of one layer, in order, to an empty
directory that will serve as an overlayfs lowerdir.

OCI whiteouts become overlayfs markers in the layer's own directory (what
containerd's overlay snapshotter does):

- `.wh.<name>`   -> a 0/0 character device `<name>` (an overlay whiteout);
- `.wh..wh..opq` -> xattr `trusted.overlay.opaque=y` on the directory holding it.

The OCI rule "whiteouts only hide lower layers" makes this order-independent:
an entry this layer adds under the same name stays, and a directory that both
appears in this layer and is whited out in it becomes opaque. `.wh..wh.*`
entries other than the opaque marker (aufs bookkeeping) are skipped.

Safety. Names are normalised the way Docker does it: leading `/` are stripped
(an absolute name lands inside the layer), `a/../b` is `b`, and a name or a
hard link target that still climbs above the root is refused (Docker would
clamp `/../x` to `x`; refusing is stricter). Nothing is written through a
symlink: every parent directory is opened component by component from a
descriptor on the root with O_NOFOLLOW (missing parents are created 0755
root:root), every node is created by an *at() call on that descriptor with
O_EXCL / mkdir / mknod / symlink / link (which never follow the last
component), and a parent that is a symlink or not a directory is an error.
An existing entry is replaced (unlinked, or removed with its subtree) rather
than written through; two directories merge, the later one's attributes win.

Metadata: numeric uid/gid, mode (setuid/setgid/sticky included: chown comes
first), mtime and PAX atime to the nanosecond, PAX `SCHILY.xattr.*` (except
`trusted.overlay.*`, which only this module writes; xattrs the filesystem or
our privileges refuse are skipped with a warning, like Docker does).
Directory modes and times are applied by `finish()`, after all entries.
Unprivileged (tests), ownership changes are skipped.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Callable
from typing import Protocol

from cri.errors import Internal, InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_PAX_XATTR = "SCHILY.xattr."
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(InvalidArgument):
    """The layer is malformed, unsafe, or does not match its diff id."""


class DataSource(Protocol):
    """Where member data is read from: the archive stream, by absolute offset."""

    def seek(self, pos: int, whence: int = ..., /) -> int: ...

    def read_some(self, n: int, /) -> bytes: ...


def os_error(exc: OSError, what: str) -> Exception:
    """A host-side failure as a domain error: full disk is ResourceExhausted."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: no space left: {exc}")
    return Internal(f"{what}: {exc}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _clean(name: str, what: str) -> str:
    """Normalise a tar path to a relative one ('' is the root); refuse escapes."""
    if "\x00" in name:
        raise LayerError(f"{what} has a NUL byte in its name")
    rel = posixpath.normpath(name.lstrip("/")) if name.lstrip("/") else "."
    if rel == ".":
        return ""
    if rel == ".." or rel.startswith("../"):
        raise LayerError(f"{what} points outside the layer root")
    return rel


def _pax_ns(text: str) -> int:
    """Exact nanoseconds from a PAX time like '1400000000.25' (floats lose digits)."""
    neg = text.startswith("-")
    sec, _, frac = text.lstrip("+-").partition(".")
    ns = int(sec or "0") * 1_000_000_000 + int((frac + "000000000")[:9])
    return -ns if neg else ns


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in ns: PAX values when present, else the header's seconds."""
    try:
        pax_m = m.pax_headers.get("mtime")
        mtime = _pax_ns(pax_m) if pax_m else int(m.mtime) * 1_000_000_000
        pax_a = m.pax_headers.get("atime")
        return (_pax_ns(pax_a) if pax_a else mtime), mtime
    except ValueError:
        mtime = int(m.mtime) * 1_000_000_000
        return mtime, mtime


class TreeWriter:
    """Applies one layer's tar members beneath `root_fd` (the caller owns and closes it)."""

    def __init__(self, root_fd: int, src: DataSource) -> None:
        self.root_fd = root_fd
        self.src = src
        self.privileged = os.geteuid() == 0
        self._cache_key: str | None = None  # parent dir of the last entry, kept open
        self._cache_fd = -1
        self._dirs: dict[str, tuple[int, int, int]] = {}  # rel -> (mode, atime_ns, mtime_ns)
        self._whiteouts: set[str] = set()  # whiteout devices this layer created
        self._warned: set[str] = set()

    # -- entry dispatch --

    def apply(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = _clean(m.name, f"layer entry {m.name!r}")
        parent, _, base = rel.rpartition("/")
        try:
            if rel == "":
                if not m.isdir():
                    raise LayerError(f"layer entry {m.name!r} (the root) is not a directory")
                self._meta_fd(self.root_fd, m, rel)
                self._dirs[rel] = (stat.S_IMODE(m.mode), *_times(m))
            elif base.startswith(WHITEOUT_PREFIX):
                self._whiteout(m, parent, base)
            elif m.isdir():
                self._mkdir(m, rel, parent, base)
            elif m.isreg():
                self._file(tf, m, rel, parent, base)
            elif m.issym():
                self._node(m, rel, parent, base, lambda fd: os.symlink(m.linkname, base, dir_fd=fd))
            elif m.islnk():
                self._hardlink(m, rel, parent, base)
            elif m.ischr() or m.isblk() or m.isfifo():
                self._node(m, rel, parent, base, lambda pfd: self._mknod(m, base, pfd))
            else:
                raise LayerError(f"layer entry {m.name!r} has unsupported type {m.type!r}")
        except ValueError as exc:  # e.g. a NUL in a link target
            raise LayerError(f"layer entry {m.name!r}: {exc}") from exc
        except OSError as exc:
            raise os_error(exc, f"layer entry {m.name!r}") from exc

    def _mkdir(self, m: tarfile.TarInfo, rel: str, parent: str, base: str) -> None:
        pfd = self._parent(parent, m.name)
        replaced = None
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            replaced = self._clear(pfd, base, rel, keep_dir=True)
            if replaced != "dir":
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        try:
            if replaced == "whiteout":
                self._set_opaque(fd, rel)  # whited out and re-created in this layer
            self._meta_fd(fd, m, rel)
        finally:
            os.close(fd)
        self._dirs[rel] = (stat.S_IMODE(m.mode), *_times(m))

    def _file(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, parent: str, base: str
    ) -> None:
        pfd = self._parent(parent, m.name)
        try:
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._clear(pfd, base, rel, keep_dir=False)
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=pfd)
        try:
            if m.issparse():
                sparse = tf.extractfile(m)
                while sparse is not None and (buf := sparse.read(_CHUNK)):
                    _write_all(fd, buf)
            else:
                self.src.seek(m.offset_data)
                left = m.size
                while left:
                    buf = self.src.read_some(min(left, _CHUNK))
                    if not buf:
                        raise LayerError(f"layer entry {m.name!r}: the archive ends in its data")
                    _write_all(fd, buf)
                    left -= len(buf)
            self._meta_fd(fd, m, rel)
            os.utime(fd, ns=_times(m))
        finally:
            os.close(fd)

    def _node(
        self, m: tarfile.TarInfo, rel: str, parent: str, base: str, create: Callable[[int], None]
    ) -> None:
        """Symlinks, devices, fifos: create at `base` under the parent descriptor."""
        pfd = self._parent(parent, m.name)
        try:
            create(pfd)
        except FileExistsError:
            self._clear(pfd, base, rel, keep_dir=False)
            create(pfd)
        self._meta_at(pfd, base, m, rel)

    def _mknod(self, m: tarfile.TarInfo, base: str, pfd: int) -> None:
        if m.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
            return
        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
        os.mknod(base, kind | 0o600, os.makedev(m.devmajor, m.devminor), dir_fd=pfd)

    def _hardlink(self, m: tarfile.TarInfo, rel: str, parent: str, base: str) -> None:
        target = _clean(m.linkname, f"hard link target {m.linkname!r} of layer entry {m.name!r}")
        tparent, _, tbase = target.rpartition("/")
        if target in ("", rel) or tbase.startswith(WHITEOUT_PREFIX) or target in self._whiteouts:
            raise LayerError(f"layer entry {m.name!r}: invalid hard link target {m.linkname!r}")
        tfd = self._open_existing(tparent, m.name, m.linkname)
        try:
            try:
                st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise LayerError(
                    f"layer entry {m.name!r}: hard link target {m.linkname!r} is not in the layer"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise LayerError(
                    f"layer entry {m.name!r}: hard link target {m.linkname!r} is a directory"
                )
            pfd = self._parent(parent, m.name)

            def link(dst_fd: int) -> None:
                os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=dst_fd, follow_symlinks=False)

            try:
                link(pfd)
            except FileExistsError:
                self._clear(pfd, base, rel, keep_dir=False)
                try:
                    link(pfd)
                except FileNotFoundError:
                    raise LayerError(
                        f"layer entry {m.name!r} replaced its own hard link target {m.linkname!r}"
                    ) from None
        finally:
            os.close(tfd)

    # -- whiteouts --

    def _whiteout(self, m: tarfile.TarInfo, parent: str, base: str) -> None:
        if base == OPAQUE_MARKER:
            pfd = self._parent(parent, m.name)
            self._set_opaque(pfd, parent)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            log.debug("skipping aufs metadata entry %r", m.name)
            return
        name = base[len(WHITEOUT_PREFIX) :]
        if name in ("", ".", ".."):
            raise LayerError(f"layer entry {m.name!r} is an invalid whiteout")
        rel = posixpath.join(parent, name)
        pfd = self._parent(parent, m.name)
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            os.mknod(name, stat.S_IFCHR, 0, dir_fd=pfd)
            self._chown_at(pfd, name, m.uid, m.gid)
            self._whiteouts.add(rel)
            return
        # This layer already has `name`: the whiteout only hides the lower layers' one.
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
            try:
                self._set_opaque(fd, rel)
            finally:
                os.close(fd)

    def _set_opaque(self, fd: int, rel: str) -> None:
        try:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        except OSError as exc:
            raise Internal(
                f"cannot mark directory {'/' + rel!r} opaque ({OPAQUE_XATTR}): {exc}; "
                "layers with opaque whiteouts need root and a filesystem with trusted xattrs"
            ) from exc

    # -- replacing existing entries --

    def _clear(self, pfd: int, base: str, rel: str, keep_dir: bool) -> str:
        """Remove what is at `base` so a new entry can take its place.

        Returns what was there: 'dir' (kept when keep_dir), 'whiteout' (one this
        layer made), 'other', or 'none'.
        """
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return "none"
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return "dir"
            self._forget(rel)
            shutil.rmtree(base, dir_fd=pfd)
            return "other"
        os.unlink(base, dir_fd=pfd)
        if rel in self._whiteouts:
            self._whiteouts.discard(rel)
            return "whiteout"
        return "other"

    def _forget(self, rel: str) -> None:
        """A directory tree is going away: drop what we remember below it."""
        prefix = rel + "/"
        if self._cache_key is not None and (
            self._cache_key == rel or self._cache_key.startswith(prefix)
        ):
            self._drop_cache()
        for key in [k for k in self._dirs if k == rel or k.startswith(prefix)]:
            del self._dirs[key]
        self._whiteouts = {w for w in self._whiteouts if not w.startswith(prefix)}

    # -- safe directory walking --

    def _parent(self, parent: str, entry: str) -> int:
        """Descriptor of directory `parent` (created if missing); owned by the cache."""
        if parent == "":
            return self.root_fd
        if parent == self._cache_key:
            return self._cache_fd
        start_fd, walked, rest = self.root_fd, "", parent
        if self._cache_key is not None and parent.startswith(self._cache_key + "/"):
            start_fd, walked = self._cache_fd, self._cache_key
            rest = parent[len(walked) + 1 :]
        fd = start_fd
        try:
            for comp in rest.split("/"):
                walked = f"{walked}/{comp}" if walked else comp
                nfd = self._open_dir(fd, comp, walked, entry, create=True)
                if fd != start_fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != start_fd:
                os.close(fd)
            raise
        self._drop_cache()
        self._cache_key, self._cache_fd = parent, fd
        return fd

    def _open_existing(self, parent: str, entry: str, linkname: str) -> int:
        """A new descriptor on an existing directory (hard link targets); caller closes."""
        fd = os.dup(self.root_fd)
        if parent == "":
            return fd
        try:
            walked = ""
            for comp in parent.split("/"):
                walked = f"{walked}/{comp}" if walked else comp
                try:
                    nfd = self._open_dir(fd, comp, walked, entry, create=False)
                except FileNotFoundError:
                    raise LayerError(
                        f"layer entry {entry!r}: hard link target {linkname!r} is not in the layer"
                    ) from None
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_dir(self, fd: int, comp: str, walked: str, entry: str, create: bool) -> int:
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(comp, 0o755, dir_fd=fd)
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.fchmod(nfd, 0o755)  # whatever the umask
            return nfd
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.stat(comp, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise LayerError(
                f"layer entry {entry!r} would be written through the symlink {walked!r}"
            )
        if create and walked in self._whiteouts:
            # Whited out earlier in this layer, now a directory with content: opaque.
            os.unlink(comp, dir_fd=fd)
            self._whiteouts.discard(walked)
            os.mkdir(comp, 0o755, dir_fd=fd)
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.fchmod(nfd, 0o755)
            self._set_opaque(nfd, walked)
            return nfd
        raise LayerError(f"layer entry {entry!r}: {walked!r} is not a directory")

    def _drop_cache(self) -> None:
        if self._cache_key is not None:
            os.close(self._cache_fd)
        self._cache_key, self._cache_fd = None, -1

    # -- metadata --

    def _meta_fd(self, fd: int, m: tarfile.TarInfo, rel: str) -> None:
        """Owner, mode (not for directories: see finish), xattrs on an open node."""
        try:
            os.fchown(fd, m.uid, m.gid)
        except PermissionError:
            if self.privileged:
                raise
        if not m.isdir():
            os.fchmod(fd, stat.S_IMODE(m.mode))
        for name, value in self._xattrs(m):
            self._setxattr(lambda n, v: os.setxattr(fd, n, v), name, value, rel)

    def _meta_at(self, pfd: int, base: str, m: tarfile.TarInfo, rel: str) -> None:
        """Owner, mode, xattrs, times on a node we cannot open (symlink, device, fifo)."""
        self._chown_at(pfd, base, m.uid, m.gid)
        if not m.issym():
            os.chmod(base, stat.S_IMODE(m.mode), dir_fd=pfd)
        proc = f"/proc/self/fd/{pfd}/{base}"  # resolves the parent through the descriptor
        for name, value in self._xattrs(m):
            self._setxattr(
                lambda n, v: os.setxattr(proc, n, v, follow_symlinks=False), name, value, rel
            )
        os.utime(base, ns=_times(m), dir_fd=pfd, follow_symlinks=False)

    def _chown_at(self, pfd: int, base: str, uid: int, gid: int) -> None:
        try:
            os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False)
        except PermissionError:
            if self.privileged:
                raise

    def _xattrs(self, m: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for key, value in m.pax_headers.items():
            if not key.startswith(_PAX_XATTR):
                continue
            name = key[len(_PAX_XATTR) :]
            if name.startswith("trusted.overlay."):
                self._warn_once(name, f"ignoring xattr {name} on {m.name!r}: reserved for overlay")
                continue
            out.append((name, value.encode("utf-8", "surrogateescape")))
        return out

    def _setxattr(
        self, setter: Callable[[str, bytes], None], name: str, value: bytes, rel: str
    ) -> None:
        try:
            setter(name, value)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self._warn_once(name, f"cannot set xattr {name} on {'/' + rel!r}: {exc}; skipped")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def finish(self) -> None:
        """Directory modes and times, last, so that creating children cannot change them."""
        self._drop_cache()
        for rel, (mode, atime, mtime) in self._dirs.items():
            fd = self._dir_if_present(rel)
            if fd is None:
                continue  # replaced later in the layer by a non-directory
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)

    def _dir_if_present(self, rel: str) -> int | None:
        fd = os.dup(self.root_fd)
        for comp in rel.split("/") if rel else ():
            try:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = nfd
        return fd

    def close(self) -> None:
        self._drop_cache()
