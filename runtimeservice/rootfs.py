"""A container's root filesystem: one overlayfs mount over the image's layers.

Lower dirs are the image's unpacked layers (top-most first); the upper and
work dirs live in the container's own directory, so the writable layer is
removed with the container.

mount(2) takes its options in one page (4096 bytes). A long chain of layers
with absolute paths overflows it, so when the options are too long the
container's directory gets a `lower/` folder of one-or-two-character symlinks
to the layers (as Docker's overlay2 driver does with its `l/` links) and the
mount is made by a child process whose working directory is that folder,
naming the layers by those links. Short option strings, the common case, are
mounted directly with one syscall in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cri.errors import FailedPrecondition, Internal, InvalidArgument

PAGE_LIMIT = 4096 - 1  # the kernel copies at most one page, NUL included
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class RootfsPaths:
    """Where a container's writable layer and mount point live."""

    base: Path  # the container's directory

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def merged(self) -> Path:
        return self.base / "rootfs"

    @property
    def links(self) -> Path:
        return self.base / "lower"


def overlay_options(lowers: Sequence[Path | str], upper: Path, work: Path) -> str:
    for p in (*lowers, upper, work):
        if any(c in str(p) for c in ",:\n"):
            raise InvalidArgument(f"overlay path {p} contains a character mount cannot take")
    return f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={upper},workdir={work}"


def _short_links(lowers: Sequence[Path], links: Path) -> list[str]:
    """Symlinks named 0, 1, … z0 … to each lower dir; their names, in order."""
    links.mkdir(exist_ok=True)
    names = []
    for i, target in enumerate(lowers):
        name = f"{i:x}"
        link = links / name
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(target)
        names.append(name)
    return names


def _mount_overlay_sync(lowers: Sequence[Path], paths: RootfsPaths) -> None:
    if not lowers:
        raise InvalidArgument("an image without layers cannot be a root filesystem")
    for d in (paths.upper, paths.work, paths.merged):
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
    opts = overlay_options(lowers, paths.upper, paths.work)
    if len(opts) <= PAGE_LIMIT:
        rc = _libc.mount(b"overlay", str(paths.merged).encode(), b"overlay", 0, opts.encode())
        if rc != 0:
            err = ctypes.get_errno()
            raise Internal(f"cannot mount the rootfs at {paths.merged}: {os.strerror(err)}")
        return
    opts = overlay_options(_short_links(lowers, paths.links), paths.upper, paths.work)
    if len(opts) > PAGE_LIMIT:
        raise FailedPrecondition(f"image has too many layers ({len(lowers)}) to mount")
    import subprocess

    done = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(paths.merged)],
                          cwd=paths.links, capture_output=True, text=True)
    if done.returncode != 0:
        raise Internal(f"cannot mount the rootfs at {paths.merged}: {done.stderr.strip()}")


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split(" ", 5)[4].replace("\\040", " ")
            if point == target:
                return True
    return False


def _unmount_sync(paths: RootfsPaths) -> None:
    target = str(paths.merged).encode()
    for _ in range(8):  # stacked mounts, if any
        if _libc.umount2(target, 0) == 0:
            continue
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            break  # not a mount point (any more)
        if err == errno.EBUSY and _libc.umount2(target, _MNT_DETACH) == 0:
            continue
        raise Internal(f"cannot unmount {paths.merged}: {os.strerror(err)}")


async def mount(lowers: Sequence[Path], paths: RootfsPaths) -> None:
    """Mount the overlay at `paths.merged`; undo with `unmount`."""
    await asyncio.to_thread(_mount_overlay_sync, lowers, paths)


async def unmount(paths: RootfsPaths) -> None:
    """Unmount the rootfs (idempotent)."""
    await asyncio.to_thread(_unmount_sync, paths)


def _remove_sync(paths: RootfsPaths) -> None:
    import shutil

    _unmount_sync(paths)
    if is_mounted(paths.merged):
        raise Internal(f"{paths.merged} is still mounted")
    for d in (paths.upper, paths.work, paths.merged, paths.links):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)


async def remove(paths: RootfsPaths) -> None:
    """Unmount and delete the writable layer (idempotent)."""
    await asyncio.to_thread(_remove_sync, paths)


def usage(paths: RootfsPaths) -> tuple[int, int]:
    """Bytes and inodes used by the writable layer."""
    total, inodes = 0, 0
    for root, dirs, files in os.walk(paths.upper):
        for name in (*dirs, *files):
            inodes += 1
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total, inodes
