"""Pinned pod namespaces: network, IPC and UTS, held by bind mounts.

A sandbox's namespaces are created once and bind-mounted onto files
(``<runroot>/ns/<sandbox-id>/{net,ipc,uts}``), so no process has to keep them
alive: runc joins them by path, CNI plugins enter the network one by path, and
they survive a daemon restart.

How they are made. Namespaces belong to a task (a thread), not to a process.
``unshare(CLONE_NEWNET|CLONE_NEWIPC|CLONE_NEWUTS)`` is allowed in a
multi-threaded process and moves only the calling thread, so each create runs
in a fresh, short-lived OS thread: it unshares, sets the hostname and the
namespaced sysctls (``/proc/sys`` resolves net and ipc entries against the
*calling thread's* namespaces), bind-mounts ``/proc/thread-self/ns/<kind>``
onto the pin files, and exits, which drops its own references. This is the
way containerd pins network namespaces; it needs no fork of the (threaded,
asyncio) daemon and no helper binary, and costs about 2 ms for all three
namespaces, most of it the kernel creating the network namespace (a
``python3 -c`` helper took ~25 ms, ``unshare(1)`` + busybox ~5 ms). Entering an
existing namespace (`run_in_namespaces`) works the same way with ``setns``.

Mount propagation. The pin root (the parent of the per-sandbox directories) is
made a mount point of its own (a bind mount onto itself) and marked *private*:
pins then never propagate into other mount namespaces, even on hosts where /
is shared (systemd), so thousands of pods do not copy mounts into every
service's namespace. A mount namespace cloned after pinning (runc's, before its
pivot_root; a hostPath bind of the runroot) does get private copies; unpinning
unlinks the pin file, and since Linux 3.18 unlinking a mount point detaches the
mounts on it in every namespace, so such copies do not keep the namespace (and
the pod's veth) alive. tests/integration/test_namespaces.py checks this.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from cri.errors import AlreadyExists, CribError, Internal, InvalidArgument, NotFound
from runtimeservice.sysctls import Sysctl, SysctlNamespace

log = logging.getLogger(__name__)

T = TypeVar("T")

_MS_BIND = 0x1000
_MS_PRIVATE = 1 << 18
_MNT_DETACH = 2


class NamespaceKind(StrEnum):
    """A namespace a sandbox can own; the value is its name under /proc/<pid>/ns."""

    NET = "net"
    IPC = "ipc"
    UTS = "uts"

    @property
    def clone_flag(self) -> int:
        return _CLONE_FLAGS[self]


_CLONE_FLAGS = {
    NamespaceKind.NET: 0x40000000,
    NamespaceKind.IPC: 0x08000000,
    NamespaceKind.UTS: 0x04000000,
}
_SYSCTL_KIND = {
    SysctlNamespace.NET: NamespaceKind.NET,
    SysctlNamespace.IPC: NamespaceKind.IPC,
    SysctlNamespace.UTS: NamespaceKind.UTS,
}


@dataclass(frozen=True)
class PodNamespaces:
    """A sandbox's pinned namespaces: the directory and the kinds pinned in it."""

    directory: Path
    kinds: tuple[NamespaceKind, ...]

    def path(self, kind: NamespaceKind) -> Path | None:
        """The pin file of `kind`, or None when the pod uses the host's namespace."""
        return self.directory / kind.value if kind in self.kinds else None

    def paths(self) -> dict[NamespaceKind, Path]:
        return {k: self.directory / k.value for k in self.kinds}

    @property
    def net(self) -> Path | None:
        return self.path(NamespaceKind.NET)


# ------------------------------------------------------------------ syscalls


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _oserror(what: str, path: object = None) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", None if path is None else str(path))


def _mount(source: str | None, target: str, flags: int) -> None:
    src = None if source is None else os.fsencode(source)
    if _libc().mount(src, os.fsencode(target), None, flags, None) != 0:
        raise _oserror("mount", target)


def _umount_detach(target: Path) -> bool:
    """Lazily unmount `target`; False when it was not a mount point."""
    if _libc().umount2(os.fsencode(target), _MNT_DETACH) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOENT):
        return False
    raise _oserror("umount2", target)


@functools.cache
def _nsfs_dev() -> int:
    return os.stat("/proc/self/ns/net").st_dev


# ------------------------------------------------------------------ checks


def is_pinned(path: Path) -> bool:
    """True when `path` is a mount of a namespace file (an nsfs inode)."""
    try:
        return os.lstat(path).st_dev == _nsfs_dev()
    except (FileNotFoundError, NotADirectoryError):
        return False


def namespace_id(path: Path) -> int:
    """The inode number identifying the namespace pinned at `path`."""
    if not is_pinned(path):
        raise NotFound(f"no namespace is pinned at {path}")
    return os.stat(path).st_ino


_OCTAL = re.compile(rb"\\([0-7]{3})")


def _mountinfo_points() -> set[str]:
    """Mount points of this mount namespace (octal escapes such as \\040 decoded)."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            field = line.split(b" ", 5)[4]
            points.add(os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m[1], 8)]), field)))
    return points


def _is_mount_point(path: Path) -> bool:
    return str(path) in _mountinfo_points()


# ------------------------------------------------------------------ pin root

_prepared: set[Path] = set()
_prepare_lock = threading.Lock()


def prepare_root(root: Path) -> None:
    """Make `root` a private mount point of its own (idempotent, once per process)."""
    root = Path(os.path.abspath(root))
    with _prepare_lock:
        if root in _prepared:
            return
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        if not _is_mount_point(root):
            _mount(str(root), str(root), _MS_BIND)
        _mount(None, str(root), _MS_PRIVATE)
        _prepared.add(root)


def release_root(root: Path) -> None:
    """Undo `prepare_root` (tests, uninstall): unmount the self-bind of `root`.

    Refuses while pins remain below it. Idempotent.
    """
    root = Path(os.path.abspath(root))
    with _prepare_lock:
        if root.is_dir():
            pinned = [p for d in root.iterdir() if d.is_dir() for p in d.iterdir()
                      if is_pinned(p)]
            if pinned:
                raise Internal(f"namespace pins remain under {root}: {pinned[0]}")
        while _is_mount_point(root) and _umount_detach(root):
            pass
        _prepared.discard(root)


# ------------------------------------------------------------------ threads


def _run_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run `fn` in a new OS thread that exits afterwards; a future for its result."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)  # type: ignore[arg-type]

    def main() -> None:
        try:
            result = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(deliver, None, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=main, name="crib-ns", daemon=True).start()
    return fut


def _write_sysctl(s: Sysctl) -> None:
    path = "/proc/sys/" + s.proc_path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(
            f"sysctl {s.name!r} does not exist in the pod's {s.namespace.value} namespace"
        ) from None
    try:
        os.write(fd, s.value.encode())
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise InvalidArgument(f"sysctl {s.name!r}: invalid value {s.value!r}") from None
        raise Internal(f"cannot set sysctl {s.name!r} to {s.value!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _apply_in_thread(hostname: str | None, sysctls: Sequence[Sysctl]) -> None:
    if hostname is not None:
        raw = hostname.encode()
        if _libc().sethostname(raw, len(raw)) != 0:
            raise InvalidArgument(f"cannot set hostname {hostname!r}: "
                                  f"{os.strerror(ctypes.get_errno())}")
    for s in sysctls:
        _write_sysctl(s)


def _check_sysctl_kinds(kinds: Iterable[NamespaceKind], sysctls: Sequence[Sysctl]) -> None:
    owned = set(kinds)
    for s in sysctls:
        if _SYSCTL_KIND[s.namespace] not in owned:
            # Writing it would change the node: the pod does not own that namespace.
            raise InvalidArgument(
                f"sysctl {s.name!r} needs a private {s.namespace.value} namespace")


def _create_sync(
    directory: Path, kinds: tuple[NamespaceKind, ...], hostname: str | None,
    sysctls: Sequence[Sysctl],
) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    targets = [directory / k.value for k in kinds]
    for t in targets:
        if is_pinned(t):
            raise AlreadyExists(f"a namespace is already pinned at {t}")
    try:
        for t in targets:
            os.close(os.open(t, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
        flags = 0
        for k in kinds:
            flags |= k.clone_flag
        if _libc().unshare(flags) != 0:
            raise _oserror("unshare")
        _apply_in_thread(hostname if NamespaceKind.UTS in kinds else None, sysctls)
        for k, t in zip(kinds, targets, strict=True):
            _mount(f"/proc/thread-self/ns/{k.value}", str(t), _MS_BIND)
    except BaseException:
        for t in targets:
            with contextlib.suppress(OSError):
                unpin(t)
        raise


# ------------------------------------------------------------------ public API


async def create(
    directory: Path,
    kinds: Iterable[NamespaceKind] = tuple(NamespaceKind),
    *,
    hostname: str | None = None,
    sysctls: Sequence[Sysctl] = (),
) -> PodNamespaces:
    """Create new namespaces of `kinds` and pin them under `directory`.

    `directory` is the sandbox's own (``<runroot>/ns/<sandbox-id>``); its parent
    is prepared as a private mount point on first use. `hostname` is set in the
    new UTS namespace; `sysctls` (validated by `sysctls.validate`) are written
    in the new namespaces and must all belong to one of `kinds`. On failure
    nothing is left pinned. Undo with `remove(directory)`.
    """
    kinds_t = tuple(dict.fromkeys(NamespaceKind(k) for k in kinds))
    _check_sysctl_kinds(kinds_t, sysctls)
    directory = Path(os.path.abspath(directory))
    if not kinds_t:
        return PodNamespaces(directory=directory, kinds=())
    if directory.parent not in _prepared:
        await asyncio.to_thread(prepare_root, directory.parent)
    fut = _run_thread(lambda: _create_sync(directory, kinds_t, hostname, sysctls))
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        # The thread cannot be stopped: wait for it, then undo what it made.
        await asyncio.wait([fut])
        await remove(directory)
        raise
    except OSError as exc:
        raise Internal(f"cannot create pod namespaces in {directory}: {exc}") from exc
    log.debug("pinned %s namespaces in %s", ",".join(k.value for k in kinds_t), directory)
    return PodNamespaces(directory=directory, kinds=kinds_t)


def unpin(path: Path) -> None:
    """Unmount (detached) and delete a pin file; fine if already gone."""
    for _ in range(16):  # a file can carry stacked mounts
        if not is_pinned(path) or not _umount_detach(path):
            break
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_sync(directory: Path) -> None:
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name in NamespaceKind._value2member_map_ or is_pinned(entry):
            unpin(entry)
    try:
        directory.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        left = sorted(p.name for p in directory.iterdir())
        raise Internal(f"cannot remove namespace directory {directory}: "
                       f"{exc.strerror}; it still holds {left}") from None


async def remove(directory: Path) -> None:
    """Unpin every namespace under `directory` and delete it. Idempotent."""
    await asyncio.to_thread(_remove_sync, Path(os.path.abspath(directory)))


def _enter_sync(paths: Mapping[NamespaceKind, Path], fn: Callable[[], T]) -> T:
    for kind, path in paths.items():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{kind.value} namespace {path} does not exist") from None
        try:
            if _libc().setns(fd, kind.clone_flag) != 0:
                raise _oserror(f"setns {kind.value}", path)
        finally:
            os.close(fd)
    return fn()


async def run_in_namespaces(paths: Mapping[NamespaceKind, Path], fn: Callable[[], T]) -> T:
    """Run blocking `fn` in a fresh thread that has joined the namespaces in `paths`.

    Whatever `fn` opens there (a netlink socket, a /proc/sys file) belongs to
    those namespaces. The thread exits afterwards, so nothing else ever runs in
    them. `fn` must not start threads or touch the event loop.
    """
    for kind, path in paths.items():
        if not is_pinned(Path(path)) and not str(path).startswith("/proc/"):
            raise NotFound(f"no {kind.value} namespace is pinned at {path}")
    try:
        return await _run_thread(lambda: _enter_sync(paths, fn))
    except CribError:
        raise
    except OSError as exc:
        raise Internal(f"cannot enter namespaces {dict(paths)}: {exc}") from exc


async def apply_sysctls(pod: PodNamespaces, sysctls: Sequence[Sysctl]) -> None:
    """Write sysctls into a sandbox's existing namespaces (e.g. after CNI ADD)."""
    if not sysctls:
        return
    _check_sysctl_kinds(pod.kinds, sysctls)
    needed = {_SYSCTL_KIND[s.namespace] for s in sysctls}
    paths = {k: p for k, p in pod.paths().items() if k in needed}
    await run_in_namespaces(paths, lambda: _apply_in_thread(None, sysctls))
