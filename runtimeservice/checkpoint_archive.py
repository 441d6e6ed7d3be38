"""The container checkpoint archive: the format CRI-O and Podman write for
`kubectl checkpoint`, and the writable layer's changes that go into it.

Layout (an uncompressed tar, mode 0600: it holds every memory page of the
container), the member names checkpointctl and CRI-O's restore look for:

    checkpoint/        CRIU's images (`runc checkpoint --image-path`)
    dump.log           CRIU's log (`--work-path`), when written
    stats-dump         CRIU's dump statistics, when written
    config.dump        JSON: id, name, rootfsImage, rootfsImageRef,
                       rootfsImageName, runtime, createdTime, checkpointedTime,
                       restoredTime, restored (times in Go's RFC 3339 form)
    spec.dump          the container's OCI config.json
    bind.mounts        JSON list of {source, destination, file_type, permissions}
                       for the spec's bind mounts, when there are any
    rootfs-diff.tar    new and changed files of the writable layer, names
                       relative to the rootfs ("etc/foo"), when there are any
    deleted.files      JSON list of paths ("/etc/foo") deleted from the image's
                       layers, when there are any

The writable layer's changes come straight from the overlay upper dir: a
whiteout (a 0/0 character device) is a deleted file; an opaque directory
(`trusted.overlay.opaque=y`) hides everything below it in the lower layers, so
each lower entry it hides is listed as deleted too (when the lower dirs are
given). Mount points of the spec's mounts are left out, as CRI-O does.
Ownership is kept numerically (no host user names); file capabilities are kept
as PAX `SCHILY.xattr.security.capability` records, as Go's tar writer does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
import tarfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cri.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

# Member names of a checkpoint archive (checkpointctl's lib/metadata.go names).
CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
BIND_MOUNTS = "bind.mounts"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
DUMP_LOG = "dump.log"
STATS_DUMP = "stats-dump"
REQUIRED_MEMBERS = (CHECKPOINT_DIR, CONFIG_DUMP, SPEC_DUMP)
# In this order; the ones that may be absent are skipped.
ARCHIVE_ORDER = (CHECKPOINT_DIR, DUMP_LOG, STATS_DUMP, CONFIG_DUMP, SPEC_DUMP, BIND_MOUNTS,
                 ROOTFS_DIFF, DELETED_FILES)

# Paths the runtime mounts over; their mount points in the upper dir are not
# changes the user made (CRI-O's list).
RUNTIME_MOUNTS = frozenset({"/dev", "/dev/shm", "/proc", "/run", "/run/.containerenv",
                            "/run/secrets", "/sys"})
GO_ZERO_TIME = "0001-01-01T00:00:00Z"
OPAQUE_XATTR = "trusted.overlay.opaque"
CAPABILITY_XATTR = "security.capability"


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class ContainerInfo:
    """What `config.dump` says about the container (CRI-O's fields)."""

    id: str
    name: str = ""
    image: str = ""  # rootfsImage: the image as the user asked for it
    image_ref: str = ""  # rootfsImageRef: the image id
    image_name: str = ""  # rootfsImageName: the image's resolved name
    runtime: str = ""  # the runtime handler
    created_at: int = 0  # nanoseconds since the epoch


@dataclass(frozen=True)
class RootfsChanges:
    """The writable layer's changes: what to copy and what was deleted."""

    include: tuple[str, ...]  # paths relative to the rootfs, parents before children
    deleted: tuple[str, ...]  # "/path" of entries hidden from the image's layers


@dataclass(frozen=True)
class ArchiveContents:
    """What `inspect_archive` found in a checkpoint archive."""

    members: frozenset[str]  # top-level names
    config: Mapping[str, Any]
    spec: Mapping[str, Any]
    rootfs_diff: tuple[str, ...]  # member names inside rootfs-diff.tar
    deleted_files: tuple[str, ...]
    image_files: tuple[str, ...]  # names under checkpoint/

# ------------------------------------------------------------------ metadata


def go_time(ns: int) -> str:
    """Nanoseconds since the epoch in Go's RFC 3339 (nano) form; 0 is Go's zero time."""
    if ns <= 0:
        return GO_ZERO_TIME
    secs, frac = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + "Z"


def config_dump(info: ContainerInfo, checkpointed_at: int) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "rootfsImage": info.image,
        "rootfsImageRef": info.image_ref,
        "rootfsImageName": info.image_name,
        "runtime": info.runtime,
        "createdTime": go_time(info.created_at),
        "checkpointedTime": go_time(checkpointed_at),
        "restoredTime": GO_ZERO_TIME,
        "restored": False,
    }


def validate_archive_path(archive: Path | str) -> Path:
    """The archive location must be absolute, in an existing directory, not a directory."""
    text = str(archive)
    if not text:
        raise InvalidArgument("checkpoint location is empty")
    path = Path(text)
    if not path.is_absolute():
        raise InvalidArgument(f"checkpoint location {text!r} is not an absolute path")
    if text.endswith("/") or path.is_dir():
        raise InvalidArgument(f"checkpoint location {text!r} is a directory, not a file name")
    if not path.parent.is_dir():
        raise InvalidArgument(
            f"checkpoint location {text!r}: directory {str(path.parent)!r} does not exist"
        )
    return path


def _is_bind(mount: Mapping[str, Any]) -> bool:
    options = mount.get("options") or ()
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def mount_destinations(spec: Mapping[str, Any]) -> frozenset[str]:
    """Every mount point of the spec plus the runtime's own, normalised ("/a/b")."""
    dests = {os.path.normpath("/" + str(m.get("destination", "")).lstrip("/"))
             for m in spec.get("mounts") or () if m.get("destination")}
    return frozenset(dests | RUNTIME_MOUNTS)


def bind_mounts(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """CRI-O's `bind.mounts`: each bind mount's source kind, so a restore can
    recreate a missing source as the right type (file or directory)."""
    found: list[dict[str, Any]] = []
    for m in spec.get("mounts") or ():
        dest = str(m.get("destination", ""))
        if dest in RUNTIME_MOUNTS or not _is_bind(m):
            continue
        source = str(m.get("source", ""))
        try:
            st = os.stat(source)
        except OSError as e:
            log.warning("checkpoint: bind mount source %s: %s; not recorded", source, e.strerror)
            continue
        found.append({
            "source": source,
            "destination": dest,
            "file_type": "directory" if stat.S_ISDIR(st.st_mode) else "file",
            "permissions": stat.S_IMODE(st.st_mode) & 0o777,
        })
    return found


# ------------------------------------------------------------------ the writable layer


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _hidden_lower_entries(rel: str, present: Collection[str], lowers: Sequence[Path]) -> set[str]:
    """Names under `rel` in the lower layers that an opaque upper dir hides."""
    hidden: set[str] = set()
    for lower in lowers:
        try:
            with os.scandir(os.path.join(lower, rel)) as it:
                for entry in it:
                    if entry.name in present:
                        continue
                    with contextlib.suppress(OSError):
                        if _is_whiteout(entry.stat(follow_symlinks=False)):
                            continue
                    hidden.add(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return hidden


def scan_upper(
    upper: Path, lowers: Sequence[Path] = (), skip: Collection[str] = RUNTIME_MOUNTS
) -> RootfsChanges:
    """Walk an overlay upper dir: what to archive, and what was deleted.

    `skip` holds "/path" mount points to leave out (their children are still
    walked); sockets are left out (they cannot be archived, and a restored
    process recreates its own).
    """
    include: list[str] = []
    deleted: list[str] = []

    def walk(rel: str) -> None:
        directory = os.path.join(upper, rel) if rel else str(upper)
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        names = {e.name for e in entries}
        if rel and _is_opaque(directory):
            deleted.extend("/" + os.path.join(rel, n)
                           for n in sorted(_hidden_lower_entries(rel, names, lowers)))
        for entry in entries:
            child = os.path.join(rel, entry.name) if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            if _is_whiteout(st):
                deleted.append("/" + child)
                continue
            if "/" + child not in skip and not stat.S_ISSOCK(st.st_mode):
                include.append(child)
            if stat.S_ISDIR(st.st_mode):
                walk(child)

    walk("")
    return RootfsChanges(tuple(include), tuple(deleted))


def _tar_filter(source_root: str) -> Callable[[tarfile.TarInfo], tarfile.TarInfo]:
    """Numeric ownership only (no host user names); keep file capabilities."""

    def apply(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        if info.isreg():
            with contextlib.suppress(OSError):
                cap = os.getxattr(os.path.join(source_root, info.name), CAPABILITY_XATTR,
                                  follow_symlinks=False)
                info.pax_headers = {**info.pax_headers,
                                    "SCHILY.xattr." + CAPABILITY_XATTR:
                                        cap.decode("utf-8", "surrogateescape")}
        return info

    return apply


def write_rootfs_diff(upper: Path, include: Sequence[str], dest: Path) -> None:
    """`rootfs-diff.tar`: the listed upper-dir entries (not recursive), relative names."""
    keep = _tar_filter(str(upper))
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for rel in include:
            found = tf.gettarinfo(os.path.join(upper, rel), arcname=rel)
            if found is None:  # a kind of file tar cannot hold
                continue
            info = keep(found)
            if info.isreg():
                with open(os.path.join(upper, rel), "rb") as f:
                    tf.addfile(info, f)
            else:
                tf.addfile(info)


def _write_json(path: Path, value: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)


def stage_metadata(
    stage: Path, spec: Mapping[str, Any], info: ContainerInfo, checkpointed_at: int
) -> None:
    """config.dump, spec.dump and bind.mounts into the staging directory."""
    _write_json(stage / CONFIG_DUMP, config_dump(info, checkpointed_at))
    _write_json(stage / SPEC_DUMP, spec)
    binds = bind_mounts(spec)
    if binds:
        _write_json(stage / BIND_MOUNTS, binds)


def stage_rootfs(stage: Path, upper: Path, changes: RootfsChanges) -> None:
    """rootfs-diff.tar and deleted.files into the staging directory (each only if non-empty)."""
    if changes.include:
        write_rootfs_diff(upper, changes.include, stage / ROOTFS_DIFF)
    if changes.deleted:
        _write_json(stage / DELETED_FILES, list(changes.deleted))


def write_archive(stage: Path, archive: Path) -> tuple[str, ...]:
    """Tar the staged members to `archive` atomically (temp file, fsync, rename).

    Returns the top-level members written. Nothing is left at or beside
    `archive` when this fails.
    """
    missing = [m for m in REQUIRED_MEMBERS if not (stage / m).exists()]
    if missing:
        raise Internal(f"checkpoint staging dir {stage} lacks {', '.join(missing)}")
    members = tuple(m for m in ARCHIVE_ORDER if (stage / m).exists())
    tmp = archive.parent / f".{archive.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            _tar_members(raw, stage, members)
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, archive)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(archive.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return members


def _tar_members(raw: BinaryIO, stage: Path, members: Sequence[str]) -> None:
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in members:
            tf.add(stage / name, arcname=name, recursive=True, filter=_tar_filter(str(stage)))


def inspect_archive(archive: Path) -> ArchiveContents:
    """Read a checkpoint archive back and check it has what a restore needs."""
    try:
        with tarfile.open(archive, "r:") as tf:
            names = tf.getnames()
            top = frozenset(n.split("/", 1)[0] for n in names)
            missing = [m for m in REQUIRED_MEMBERS if m not in top]
            if missing:
                raise InvalidArgument(
                    f"{archive} is not a container checkpoint archive: no {', '.join(missing)}")
            config = _member_json(tf, CONFIG_DUMP)
            spec = _member_json(tf, SPEC_DUMP)
            deleted = _member_json(tf, DELETED_FILES) if DELETED_FILES in top else []
            diff: list[str] = []
            if ROOTFS_DIFF in top:
                inner = tf.extractfile(ROOTFS_DIFF)
                if inner is None:
                    raise InvalidArgument(f"{archive}: {ROOTFS_DIFF} is not a regular file")
                with tarfile.open(fileobj=inner, mode="r:") as diff_tf:
                    diff = diff_tf.getnames()
    except (tarfile.TarError, OSError) as e:
        raise InvalidArgument(f"{archive} is not a readable checkpoint archive: {e}") from e
    images = tuple(n.split("/", 1)[1] for n in names
                   if n.startswith(CHECKPOINT_DIR + "/"))
    return ArchiveContents(top, config, spec, tuple(diff), tuple(deleted), images)


def _member_json(tf: tarfile.TarFile, name: str) -> Any:
    f = tf.extractfile(name)
    if f is None:
        raise InvalidArgument(f"checkpoint archive member {name} is not a regular file")
    try:
        return json.loads(f.read())
    except ValueError as e:
        raise InvalidArgument(f"checkpoint archive member {name} is not JSON: {e}") from e
