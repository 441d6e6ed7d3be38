"""The mounts of a container: runtime defaults, pod files and the CRI's host paths.

Every CRI mount is checked here before the runtime sees it: the host path must
exist (symlinks resolved on the host), recursive read-only needs a read-only
private mount and a kernel with mount_setattr(2), and a propagated mount needs
its host side to be shared (bidirectional) or shared/slave (host-to-container),
as /proc/self/mountinfo tells. The result is sorted so that a parent directory
is always mounted before anything inside it.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented

PRIVATE: Final = api_pb2.PROPAGATION_PRIVATE
HOST_TO_CONTAINER: Final = api_pb2.PROPAGATION_HOST_TO_CONTAINER
BIDIRECTIONAL: Final = api_pb2.PROPAGATION_BIDIRECTIONAL

_PROPAGATION_OPTION: Final[dict[int, str]] = {
    PRIVATE: "rprivate",
    HOST_TO_CONTAINER: "rslave",
    BIDIRECTIONAL: "rshared",
}

# Where the pod's files go inside every container.
ETC_HOSTS: Final = "/etc/hosts"
ETC_RESOLV_CONF: Final = "/etc/resolv.conf"
ETC_HOSTNAME: Final = "/etc/hostname"
DEV_SHM: Final = "/dev/shm"


@dataclass(frozen=True)
class IdMap:
    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class ResolvedMount:
    """A CRI mount after validation; ``host_path`` has its symlinks resolved."""

    container_path: str
    host_path: str
    readonly: bool = False
    propagation: int = PRIVATE
    recursive_read_only: bool = False
    uid_mappings: tuple[IdMap, ...] = ()
    gid_mappings: tuple[IdMap, ...] = ()

    def to_oci(self) -> dict[str, Any]:
        options = ["rbind", _PROPAGATION_OPTION[self.propagation]]
        options.append("ro" if self.readonly else "rw")
        if self.recursive_read_only:
            options.append("rro")
        mount: dict[str, Any] = {
            "destination": self.container_path,
            "type": "bind",
            "source": self.host_path,
            "options": options,
        }
        for key, maps in (("uidMappings", self.uid_mappings), ("gidMappings", self.gid_mappings)):
            if maps:
                mount[key] = [
                    {"containerID": m.container_id, "hostID": m.host_id, "size": m.size}
                    for m in maps
                ]
        return mount


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/<pid>/mountinfo: where it is mounted and how it propagates."""

    mount_point: str
    shared: bool
    slave: bool


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """The mounts of a mountinfo file, in file order (later lines are mounted on top)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        optional = fields[6 : fields.index("-", 6)]
        mounts.append(
            MountInfo(
                mount_point=_unescape(fields[4]),
                shared=any(f.startswith("shared:") for f in optional),
                slave=any(f.startswith("master:") for f in optional),
            )
        )
    return mounts


def mount_of(path: str, mounts: Sequence[MountInfo]) -> MountInfo | None:
    """The mount that holds ``path``: the longest mount point above it, topmost on ties."""
    best: MountInfo | None = None
    for m in mounts:
        mp = m.mount_point
        if (path == mp or mp == "/" or path.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mount_point)
        ):
            best = m
    return best


def check_propagation(
    source: str, propagation: int, mountinfo_path: str = "/proc/self/mountinfo"
) -> None:
    """Refuse a propagated mount whose host side cannot propagate (as CRI-O does).

    BIDIRECTIONAL needs the mount holding ``source`` to be shared;
    HOST_TO_CONTAINER needs it shared or a slave. FailedPrecondition otherwise,
    naming the path and the mount point to fix (``mount --make-rshared``).
    """
    if propagation == PRIVATE:
        return
    with open(mountinfo_path, encoding="utf-8", errors="surrogateescape") as f:
        mounts = parse_mountinfo(f.read())
    holder = mount_of(source, mounts)
    if holder is None:
        raise FailedPrecondition(f"cannot find the mount holding {source!r} in {mountinfo_path}")
    if propagation == BIDIRECTIONAL and not holder.shared:
        raise FailedPrecondition(
            f"path {source!r} is mounted on {holder.mount_point!r} but it is not a shared "
            "mount: bidirectional propagation needs it shared (mount --make-rshared)"
        )
    if propagation == HOST_TO_CONTAINER and not (holder.shared or holder.slave):
        raise FailedPrecondition(
            f"path {source!r} is mounted on {holder.mount_point!r} but it is not a shared "
            "or slave mount: host-to-container propagation needs one"
        )


def _id_maps(maps: Iterable[api_pb2.IDMapping]) -> tuple[IdMap, ...]:
    return tuple(IdMap(m.container_id, m.host_id, m.length) for m in maps)


def resolve_cri_mount(
    mount: api_pb2.Mount,
    *,
    rro_supported: bool,
    idmap_supported: bool,
    mountinfo_path: str = "/proc/self/mountinfo",
) -> ResolvedMount:
    """Validate one CRI mount and resolve its host path; see the module doc for the rules."""
    dest = mount.container_path
    if not dest or not posixpath.isabs(dest):
        raise InvalidArgument(f"mount container_path {dest!r} is not an absolute path")
    dest = posixpath.normpath(dest)
    if mount.HasField("image") and mount.image.image:
        raise Unimplemented(
            f"image volume {mount.image.image!r} for {dest!r}: image mounts are not supported"
        )
    if mount.propagation not in _PROPAGATION_OPTION:
        raise InvalidArgument(f"mount {dest!r}: unknown propagation {mount.propagation}")
    if (mount.uidMappings or mount.gidMappings) and not idmap_supported:
        raise Unimplemented(f"mount {dest!r}: id-mapped mounts are not supported")
    if not mount.host_path or not os.path.isabs(mount.host_path):
        raise InvalidArgument(f"mount {dest!r}: host_path {mount.host_path!r} is not absolute")
    try:
        source = os.path.realpath(mount.host_path, strict=True)
    except FileNotFoundError:
        raise NotFound(
            f"mount source {mount.host_path!r} for {dest!r} does not exist"
        ) from None
    except OSError as err:
        raise InvalidArgument(
            f"mount source {mount.host_path!r} for {dest!r}: {err.strerror}"
        ) from None
    if mount.recursive_read_only:
        if not mount.readonly:
            raise InvalidArgument(
                f"recursive read-only mount {dest!r} must also be readonly"
            )
        if mount.propagation != PRIVATE:
            raise InvalidArgument(
                f"recursive read-only mount {dest!r} needs private propagation"
            )
        if not rro_supported:
            raise InvalidArgument(
                f"recursive read-only mount {dest!r}: the kernel lacks mount_setattr (5.12+)"
            )
    check_propagation(source, mount.propagation, mountinfo_path)
    return ResolvedMount(
        container_path=dest,
        host_path=source,
        readonly=mount.readonly,
        propagation=mount.propagation,
        recursive_read_only=mount.recursive_read_only,
        uid_mappings=_id_maps(mount.uidMappings),
        gid_mappings=_id_maps(mount.gidMappings),
    )


def _bind(dest: str, source: str, readonly: bool) -> dict[str, Any]:
    return {
        "destination": dest,
        "type": "bind",
        "source": source,
        "options": ["rbind", "rprivate", "ro" if readonly else "rw"],
    }


@dataclass(frozen=True)
class DefaultMountFacts:
    """What the runtime-default mounts depend on."""

    privileged: bool = False
    readonly_rootfs: bool = False
    host_network: bool = False
    host_ipc: bool = False
    shm_path: str | None = None
    hosts_path: str | None = None
    resolv_conf_path: str | None = None
    hostname_path: str | None = None
    termination_message: tuple[str, str] | None = None  # (container path, host path)


def default_mounts(facts: DefaultMountFacts) -> list[dict[str, Any]]:
    """/proc, /dev, /dev/pts, /dev/mqueue, /sys, /sys/fs/cgroup, /dev/shm and the pod files."""
    ro = [] if facts.privileged else ["ro"]
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
    ]  # fmt: skip
    if facts.host_network:
        # A new sysfs shows the network devices of the mounter's netns; in the
        # host's netns bind the host's /sys instead (as CRI-O does).
        mounts.append({"destination": "/sys", "type": "bind", "source": "/sys",
                       "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev",
                                   *(ro or ["rw"])]})
    else:
        mounts.append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                       "options": ["nosuid", "noexec", "nodev", *(ro or ["rw"])]})
    mounts.append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                   "options": ["nosuid", "noexec", "nodev", "relatime", *(ro or ["rw"])]})
    shm = facts.shm_path or ("/dev/shm" if facts.host_ipc else None)
    if shm:
        mounts.append({"destination": DEV_SHM, "type": "bind", "source": shm,
                       "options": ["rbind", "rprivate", "rw"]})
    else:
        mounts.append({"destination": DEV_SHM, "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    for dest, source in (
        (ETC_HOSTS, facts.hosts_path),
        (ETC_RESOLV_CONF, facts.resolv_conf_path),
        (ETC_HOSTNAME, facts.hostname_path),
    ):
        if source:
            mounts.append(_bind(dest, source, facts.readonly_rootfs))
    if facts.termination_message:
        dest, source = facts.termination_message
        if not posixpath.isabs(dest):
            raise InvalidArgument(f"termination message path {dest!r} is not absolute")
        mounts.append(_bind(posixpath.normpath(dest), source, False))
    return mounts


def _depth(mount: dict[str, Any]) -> int:
    dest = posixpath.normpath(mount["destination"])
    return 0 if dest == "/" else dest.count("/")


def merge_mounts(
    defaults: Sequence[dict[str, Any]], cri: Sequence[ResolvedMount]
) -> list[dict[str, Any]]:
    """Defaults not overridden by a CRI mount at the same destination, then the CRI
    mounts; stably sorted by depth so that parents precede their children."""
    taken = {m.container_path for m in cri}
    if len(taken) != len(cri):
        dup = next(p for p in taken if sum(m.container_path == p for m in cri) > 1)
        raise InvalidArgument(f"two mounts share the container path {dup!r}")
    merged = [m for m in defaults if posixpath.normpath(m["destination"]) not in taken]
    merged.extend(m.to_oci() for m in cri)
    return sorted(merged, key=_depth)


def rootfs_propagation(cri: Iterable[ResolvedMount]) -> str | None:
    """``rshared`` if any mount propagates both ways, ``rslave`` if any receives, else None."""
    kinds = {m.propagation for m in cri}
    if BIDIRECTIONAL in kinds:
        return "rshared"
    if HOST_TO_CONTAINER in kinds:
        return "rslave"
    return None
