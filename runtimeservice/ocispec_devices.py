"""Device nodes of a container and the device cgroup rules that go with them.

A non-privileged container starts from "deny everything" (the runtime adds
its standard /dev/null, /dev/zero... itself) and gets each CRI device with the
permissions asked. A privileged container sees every device node of the host's
/dev and may use any device.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from api import api_pb2
from cri.errors import InvalidArgument, NotFound

# Not device nodes of the host, or mounted by the runtime itself.
_SKIP_DIRS: Final = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})
_SKIP_FILES: Final = frozenset({"console"})


@dataclass(frozen=True)
class Device:
    """A device node to create in the container, with its cgroup permissions."""

    path: str  # inside the container
    kind: str  # "c" or "b"
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int
    access: str = "rwm"

    def to_oci(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.kind,
            "major": self.major,
            "minor": self.minor,
            "fileMode": self.file_mode,
            "uid": self.uid,
            "gid": self.gid,
        }

    def cgroup_rule(self) -> dict[str, Any]:
        return {
            "allow": True,
            "type": self.kind,
            "major": self.major,
            "minor": self.minor,
            "access": self.access,
        }


def device_at(host_path: str, container_path: str, access: str = "rwm") -> Device | None:
    """The device node at ``host_path`` (not following a final symlink); None if not one."""
    st = os.lstat(host_path)
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return Device(
        path=container_path,
        kind=kind,
        major=os.major(st.st_rdev),
        minor=os.minor(st.st_rdev),
        file_mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        access=access,
    )


def _walk(root: str, container_root: str, access: str, skip_dirs: Iterable[str]) -> list[Device]:
    found: list[Device] = []
    skip = frozenset(skip_dirs)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in sorted(filenames):
            if dirpath == root and name in _SKIP_FILES:
                continue
            host = os.path.join(dirpath, name)
            rel = os.path.relpath(host, root)
            try:
                dev = device_at(host, posixpath.join(container_root, rel), access)
            except FileNotFoundError:
                continue  # went away while walking
            if dev is not None:
                found.append(dev)
    return found


def host_devices(dev_root: str = "/dev") -> list[Device]:
    """Every device node under the host's /dev, for a privileged container."""
    return _walk(dev_root, "/dev", "rwm", _SKIP_DIRS)


def _check_access(perms: str, container_path: str) -> str:
    perms = perms or "rwm"
    if any(c not in "rwm" for c in perms) or len(set(perms)) != len(perms):
        raise InvalidArgument(
            f"device {container_path!r}: permissions {perms!r} must be letters of 'rwm'"
        )
    return perms


def cri_devices(devices: Iterable[api_pb2.Device]) -> list[Device]:
    """Resolve the CRI devices: a device node, or a directory of them (mapped below
    the container path, as CRI-O does)."""
    out: list[Device] = []
    for d in devices:
        dest = d.container_path
        if not dest or not posixpath.isabs(dest):
            raise InvalidArgument(f"device container_path {dest!r} is not an absolute path")
        access = _check_access(d.permissions, dest)
        try:
            source = os.path.realpath(d.host_path, strict=True) if d.host_path else ""
        except FileNotFoundError:
            source = ""
        if not source:
            raise NotFound(f"device {d.host_path!r} for {dest!r} does not exist on the host")
        dev = device_at(source, posixpath.normpath(dest), access)
        if dev is not None:
            out.append(dev)
        elif os.path.isdir(source):
            out.extend(_walk(source, posixpath.normpath(dest), access, ()))
        else:
            raise InvalidArgument(f"{d.host_path!r} for {dest!r} is not a device node")
    return out


def build_devices(
    devices: Iterable[api_pb2.Device], privileged: bool, dev_root: str = "/dev"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``linux.devices`` and ``linux.resources.devices`` for the container."""
    requested = cri_devices(devices)
    if privileged:
        by_path = {d.path: d for d in host_devices(dev_root)}
        by_path.update((d.path, d) for d in requested)
        return [d.to_oci() for d in by_path.values()], [{"allow": True, "access": "rwm"}]
    by_path = {d.path: d for d in requested}
    rules = [{"allow": False, "access": "rwm"}]
    rules.extend(d.cgroup_rule() for d in by_path.values())
    return [d.to_oci() for d in by_path.values()], rules
