"""Pod cgroups on cgroup v1 (legacy or hybrid) and v2, named the cgroupfs or systemd way.

`detect` reads /proc/self/mountinfo once to learn the layout: a cgroup2 mount at
the root means unified (v2); otherwise each v1 controller has its own hierarchy
(co-mounted ones share a directory), plus ``name=systemd`` and, on hybrid
hosts, a controller-less cgroup2 at ``<root>/unified``. This is what runc's
``IsCgroup2UnifiedMode`` decides by statfs on the root.

A cgroup is named by a path relative to each hierarchy's root
(``/kubepods/besteffort/pod1/crib-<id>``). With the systemd driver the parent
is a slice name (``kubepods-besteffort-pod1.slice``) which expands, as systemd
does, to ``/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice``.
There is no systemd to ask here, so both drivers create directories directly.

`CgroupManager` creates a cgroup in every hierarchy, writes limits (converting
CPU shares and swap for v2 as runc does), reads stats, and removes a cgroup
tree without killing anything. Its methods that touch the filesystem are
coroutines running the work in a thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cri.errors import FailedPrecondition, Internal, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_CGROUPFS_PARENT = "/crib"
DEFAULT_SYSTEMD_PARENT = "crib.slice"
PREFIX = "crib"

_V1_CONTROLLERS = frozenset({
    "cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "net_cls",
    "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc"})
_V2_WANTED = ("cpuset", "cpu", "io", "memory", "hugetlb", "pids")
_UNLIMITED = 1 << 62  # v1 reports "no limit" as a huge page-aligned number
_REMOVE_TIMEOUT = 2.0


class CgroupDriver(StrEnum):
    CGROUPFS = "cgroupfs"
    SYSTEMD = "systemd"


class CgroupMode(StrEnum):
    LEGACY = "legacy"  # v1 only
    HYBRID = "hybrid"  # v1 controllers + a controller-less cgroup2 at <root>/unified
    UNIFIED = "unified"  # v2


@dataclass(frozen=True)
class CgroupLayout:
    """Where the hierarchies are mounted."""

    mode: CgroupMode
    root: Path
    v1: Mapping[str, Path] = field(default_factory=dict)  # controller or "name=x" -> dir
    unified: Path | None = None
    v2_controllers: frozenset[str] = frozenset()

    @property
    def is_v2(self) -> bool:
        return self.mode is CgroupMode.UNIFIED

    def hierarchies(self) -> list[Path]:
        """Every hierarchy directory a pod cgroup is created in, without duplicates."""
        dirs = list(dict.fromkeys(self.v1.values()))
        if self.unified is not None:
            dirs.append(self.unified)
        return dirs

    def controller_dir(self, controller: str) -> Path | None:
        """The hierarchy holding `controller`'s files, or None when it is unavailable."""
        if self.is_v2:
            return self.unified if controller in self.v2_controllers else None
        return self.v1.get(controller)


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field_)


def detect(root: Path = Path("/sys/fs/cgroup"),
           mountinfo: Path = Path("/proc/self/mountinfo")) -> CgroupLayout:
    """Learn the cgroup layout below `root` from `mountinfo`."""
    v1: dict[str, Path] = {}
    v2_mounts: list[Path] = []
    for line in mountinfo.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        mount_point = Path(_unescape(left.split()[4]))
        fstype, _source, superopts = [*right.split(), "", ""][:3]
        if mount_point != root and root not in mount_point.parents:
            continue
        if fstype == "cgroup2":
            v2_mounts.append(mount_point)
        elif fstype == "cgroup":
            for opt in superopts.split(","):
                if opt in _V1_CONTROLLERS or opt.startswith("name="):
                    v1.setdefault(opt, mount_point)
    if root in v2_mounts:
        try:
            ctrls = frozenset((root / "cgroup.controllers").read_text().split())
        except OSError:
            ctrls = frozenset()
        return CgroupLayout(CgroupMode.UNIFIED, root, unified=root, v2_controllers=ctrls)
    if not v1:
        raise FailedPrecondition(f"no cgroup hierarchy is mounted under {root}")
    unified = root / "unified"
    if unified in v2_mounts:
        return CgroupLayout(CgroupMode.HYBRID, root, v1=v1, unified=unified)
    return CgroupLayout(CgroupMode.LEGACY, root, v1=v1)


# ------------------------------------------------------------------ naming


@dataclass(frozen=True)
class CgroupPath:
    """A cgroup: its path under each hierarchy root, and its OCI ``cgroupsPath``."""

    path: str
    runc: str


def expand_slice(name: str) -> str:
    """The filesystem path of a systemd slice: ``a-b.slice`` -> ``/a.slice/a-b.slice``."""
    if not name.endswith(".slice") or "/" in name:
        raise InvalidArgument(f"invalid systemd slice {name!r}: want a name ending in .slice")
    stem = name[: -len(".slice")]
    if stem == "-":
        return "/"
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise InvalidArgument(f"invalid systemd slice {name!r}")
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def validate_cgroup_parent(parent: str, driver: CgroupDriver) -> str:
    """The normalised cgroup parent, or InvalidArgument. Empty means crib's default."""
    if "\0" in parent or "\n" in parent:
        raise InvalidArgument(f"invalid cgroup parent {parent!r}")
    if driver is CgroupDriver.SYSTEMD:
        parent = parent or DEFAULT_SYSTEMD_PARENT
        expand_slice(parent)
        return parent
    parent = parent or DEFAULT_CGROUPFS_PARENT
    if parent.endswith(".slice"):
        raise InvalidArgument(
            f"cgroup parent {parent!r} is a systemd slice but the cgroup driver is cgroupfs")
    parts = [p for p in parent.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"cgroup parent {parent!r} must not contain '.' or '..'")
    return "/" + "/".join(parts)


def _check_id(what: str, ident: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.]+", ident):
        raise InvalidArgument(f"invalid {what} id {ident!r} for a cgroup name")


def pod_cgroup_path(cgroup_parent: str, sandbox_id: str, driver: CgroupDriver) -> CgroupPath:
    """The sandbox's own cgroup below the pod's parent (which the kubelet may own).

    cgroupfs: ``<parent>/crib-<id>``; systemd: the child slice
    ``<parent-stem>-crib_<id>.slice`` of the parent slice.
    """
    _check_id("sandbox", sandbox_id)
    parent = validate_cgroup_parent(cgroup_parent, driver)
    if driver is CgroupDriver.CGROUPFS:
        path = parent.rstrip("/") + f"/{PREFIX}-{sandbox_id}"
        return CgroupPath(path=path, runc=path)
    stem = parent[: -len(".slice")]
    name = f"{PREFIX}_{sandbox_id}.slice" if stem == "-" else f"{stem}-{PREFIX}_{sandbox_id}.slice"
    return CgroupPath(path=expand_slice(name), runc=name)


def container_cgroup_path(pod: CgroupPath, container_id: str,
                          driver: CgroupDriver) -> CgroupPath:
    """A container's cgroup inside its pod's (a ``.scope`` unit under systemd naming)."""
    _check_id("container", container_id)
    if driver is CgroupDriver.CGROUPFS:
        path = pod.path.rstrip("/") + f"/{PREFIX}-{container_id}"
        return CgroupPath(path=path, runc=path)
    return CgroupPath(path=pod.path.rstrip("/") + f"/{PREFIX}-{container_id}.scope",
                      runc=f"{pod.runc}:{PREFIX}:{container_id}")


# ------------------------------------------------------------------ resources


@dataclass(frozen=True)
class CgroupResources:
    """Limits, CRI-style: 0 (or empty) leaves a value alone, -1 means unlimited."""

    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    memory_limit: int = 0
    memory_swap_limit: int = 0  # memory + swap, as on v1
    hugepage_limits: Mapping[str, int] = field(default_factory=dict)  # "2MB" -> bytes
    pids_limit: int = 0
    unified: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_cri(cls, msg: object, pids_limit: int = 0) -> CgroupResources:
        """From an `api_pb2.LinuxContainerResources`."""
        return cls(
            cpu_shares=int(getattr(msg, "cpu_shares", 0)),
            cpu_quota=int(getattr(msg, "cpu_quota", 0)),
            cpu_period=int(getattr(msg, "cpu_period", 0)),
            cpuset_cpus=str(getattr(msg, "cpuset_cpus", "")),
            cpuset_mems=str(getattr(msg, "cpuset_mems", "")),
            memory_limit=int(getattr(msg, "memory_limit_in_bytes", 0)),
            memory_swap_limit=int(getattr(msg, "memory_swap_limit_in_bytes", 0)),
            hugepage_limits={h.page_size: int(h.limit)
                             for h in getattr(msg, "hugepage_limits", ())},
            pids_limit=pids_limit,
            unified=dict(getattr(msg, "unified", {})),
        )


def shares_to_weight(shares: int) -> int:
    """runc's cpu.shares [2, 262144] -> cpu.weight [1, 10000] mapping."""
    if shares == 0:
        return 0
    return 1 + ((shares - 2) * 9999) // 262142


def swap_v2(memory_swap: int, memory: int) -> int | None:
    """memory.swap.max from the v1-style memory+swap limit (None = leave alone, -1 = max)."""
    if memory == -1 and memory_swap == 0:
        return -1
    if memory_swap in (-1, 0):
        return memory_swap or None
    if memory in (0, -1):
        raise InvalidArgument("a swap limit needs a memory limit")
    if memory_swap < memory:
        raise InvalidArgument(
            f"memory+swap limit {memory_swap} is lower than the memory limit {memory}")
    return memory_swap - memory


def _max(value: int) -> str:
    return "max" if value == -1 else str(value)


def check_resources(r: CgroupResources) -> None:
    """InvalidArgument naming the first value no cgroup accepts (before anything is written)."""
    for name in ("cpu_shares", "cpu_period", "cpu_quota", "memory_limit",
                 "memory_swap_limit", "pids_limit"):
        value = getattr(r, name)
        if value < -1 or (value == -1 and name in ("cpu_shares", "cpu_period")):
            raise InvalidArgument(f"invalid {name} {value}")
    for size, limit in r.hugepage_limits.items():
        if not re.fullmatch(r"[0-9]+[KMGT]B", size) or limit < 0:
            raise InvalidArgument(f"invalid hugepage limit {size}={limit}")
    for key in r.unified:
        if "/" in key or key.startswith(".") or "." not in key or key.startswith("cgroup."):
            raise InvalidArgument(f"invalid unified cgroup key {key!r}")


# ------------------------------------------------------------------ stats


@dataclass(frozen=True)
class CgroupStats:
    """A cgroup's usage; None where the host does not report a value."""

    cpu_usage_ns: int | None = None
    cpu_user_ns: int | None = None
    cpu_system_ns: int | None = None
    memory_usage: int | None = None
    memory_working_set: int | None = None
    memory_rss: int | None = None
    memory_limit: int | None = None  # None also when unlimited
    page_faults: int | None = None
    major_page_faults: int | None = None
    pids_current: int | None = None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if text == "max" else int(text)


def _read_kv(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


# ------------------------------------------------------------------ filesystem seams


def _mkdir(path: Path) -> None:
    os.mkdir(path, 0o755)


def _rmdir(path: Path) -> None:
    os.rmdir(path)


def _write(directory: Path, name: str, value: str) -> None:
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"cannot set {name}: {path} does not exist "
                              "(controller not available?)") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ERANGE, errno.EOVERFLOW):
            raise InvalidArgument(f"cannot set {name} to {value!r}: {exc.strerror}") from None
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(f"cannot set {name} to {value!r}: {exc.strerror}") from None
        raise Internal(f"cannot set {path} to {value!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _subtree(top: Path) -> list[Path]:
    """`top` and its descendant directories, deepest first."""
    out = []
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        out.append(Path(dirpath))
    return out


# ------------------------------------------------------------------ manager


class CgroupManager:
    """Creates, updates, inspects and removes cgroups of one layout and driver."""

    def __init__(self, layout: CgroupLayout, driver: CgroupDriver = CgroupDriver.CGROUPFS):
        self.layout = layout
        self.driver = driver

    def pod_path(self, cgroup_parent: str, sandbox_id: str) -> CgroupPath:
        return pod_cgroup_path(cgroup_parent, sandbox_id, self.driver)

    def _dirs(self, path: str) -> list[Path]:
        rel = path.strip("/")
        if any(p in (".", "..") for p in rel.split("/")):
            raise InvalidArgument(f"invalid cgroup path {path!r}")
        return [h / rel if rel else h for h in self.layout.hierarchies()]

    def exists(self, path: str) -> bool:
        return any(d.is_dir() for d in self._dirs(path))

    # -- create / update

    def _make_dirs(self, hierarchy: Path, rel: str, created: list[Path]) -> None:
        current = hierarchy
        cpuset = hierarchy == self.layout.v1.get("cpuset")
        v2 = self.layout.is_v2 and hierarchy == self.layout.unified
        for part in [p for p in rel.split("/") if p]:
            if v2:
                self._enable_controllers(current)
            child = current / part
            if not child.is_dir():
                try:
                    _mkdir(child)
                    created.append(child)
                except FileExistsError:
                    pass
            if cpuset:  # a v1 cpuset cgroup is unusable until cpus and mems are set
                for name in ("cpuset.cpus", "cpuset.mems"):
                    if not (child / name).read_text().strip():
                        _write(child, name, (current / name).read_text().strip())
            current = child

    def _enable_controllers(self, directory: Path) -> None:
        try:
            available = set((directory / "cgroup.controllers").read_text().split())
            enabled = set((directory / "cgroup.subtree_control").read_text().split())
        except FileNotFoundError:
            return
        missing = [c for c in _V2_WANTED if c in available and c not in enabled]
        if missing:
            _write(directory, "cgroup.subtree_control", " ".join("+" + c for c in missing))

    def _create_sync(self, path: str, resources: CgroupResources | None) -> None:
        if resources is not None:
            check_resources(resources)
        created: list[Path] = []
        rel = path.strip("/")
        try:
            for hierarchy in self.layout.hierarchies():
                self._make_dirs(hierarchy, rel, created)
            if resources is not None:
                self._apply(path, resources)
        except BaseException:
            for d in reversed(created):
                try:
                    _rmdir(d)
                except OSError as exc:
                    log.warning("cannot undo cgroup %s: %s", d, exc)
            raise

    async def create(self, path: str, resources: CgroupResources | None = None) -> None:
        """Create `path` in every hierarchy and apply `resources`.

        Existing levels are kept (idempotent); on failure the levels made by
        this call are removed again. Undo with `remove(path)`.
        """
        await asyncio.to_thread(self._create_sync, path, resources)

    def _add_pid_sync(self, path: str, pid: int) -> None:
        rel = path.strip("/")
        for hierarchy in self.layout.hierarchies():
            self._make_dirs(hierarchy, rel, [])
            target = hierarchy / rel if rel else hierarchy
            try:
                _write(target, "cgroup.procs", str(pid))
            except InvalidArgument as exc:
                raise Internal(f"cannot move pid {pid} into cgroup {target}: {exc}") from None

    async def add_pid(self, path: str, pid: int) -> None:
        """Move `pid` into cgroup `path` in every hierarchy, creating it where needed
        (a new v1 cpuset level inherits its parent's cpus and mems)."""
        await asyncio.to_thread(self._add_pid_sync, path, pid)

    async def update(self, path: str, resources: CgroupResources) -> None:
        """Change the limits of an existing cgroup."""
        check_resources(resources)
        await asyncio.to_thread(self._apply, path, resources)

    def _dir(self, controller: str, path: str) -> Path | None:
        base = self.layout.controller_dir(controller)
        return None if base is None else base / path.strip("/")

    def _apply(self, path: str, r: CgroupResources) -> None:
        if self.layout.is_v2:
            self._apply_v2(path, r)
        else:
            if r.unified:
                raise InvalidArgument(
                    f"unified cgroup keys {sorted(r.unified)} need cgroup v2; "
                    f"this host uses cgroup v1 ({self.layout.mode.value})")
            self._apply_v1(path, r)
        cpuset = self._dir("cpuset", path)
        if cpuset is not None:
            if r.cpuset_cpus:
                _write(cpuset, "cpuset.cpus", r.cpuset_cpus)
            if r.cpuset_mems:
                _write(cpuset, "cpuset.mems", r.cpuset_mems)
        pids = self._dir("pids", path)
        if r.pids_limit and pids is not None:
            _write(pids, "pids.max", _max(r.pids_limit))

    def _apply_v1(self, path: str, r: CgroupResources) -> None:
        cpu = self._dir("cpu", path)
        if cpu is not None:
            if r.cpu_shares:
                _write(cpu, "cpu.shares", str(r.cpu_shares))
            period_pending = False
            if r.cpu_period:
                try:
                    _write(cpu, "cpu.cfs_period_us", str(r.cpu_period))
                except InvalidArgument:
                    # A shorter period can be refused until the quota shrinks too.
                    if not r.cpu_quota:
                        raise
                    period_pending = True
            if r.cpu_quota:
                _write(cpu, "cpu.cfs_quota_us", str(r.cpu_quota))
                if period_pending:
                    _write(cpu, "cpu.cfs_period_us", str(r.cpu_period))
        mem = self._dir("memory", path)
        if mem is not None:
            self._memory_v1(mem, r.memory_limit, r.memory_swap_limit)
        huge = self._dir("hugetlb", path)
        for size, limit in r.hugepage_limits.items():
            if huge is None:
                log.debug("hugetlb controller not mounted; ignoring %s limit", size)
                continue
            _write(huge, f"hugetlb.{size}.limit_in_bytes", str(limit))

    @staticmethod
    def _memory_v1(mem: Path, memory: int, swap: int) -> None:
        has_swap = (mem / "memory.memsw.limit_in_bytes").exists()
        if memory == -1 and swap == 0:
            swap = -1
        if swap and not has_swap:
            log.debug("no swap accounting on this host; ignoring memory+swap limit")
            swap = 0
        if memory and swap:
            current = _read_int(mem / "memory.limit_in_bytes") or 0
            if swap == -1 or current < swap:  # raising: memsw must grow first
                _write(mem, "memory.memsw.limit_in_bytes", str(swap))
                _write(mem, "memory.limit_in_bytes", str(memory))
                return
            _write(mem, "memory.limit_in_bytes", str(memory))
            _write(mem, "memory.memsw.limit_in_bytes", str(swap))
            return
        if memory:
            _write(mem, "memory.limit_in_bytes", str(memory))
        if swap:
            _write(mem, "memory.memsw.limit_in_bytes", str(swap))

    def _apply_v2(self, path: str, r: CgroupResources) -> None:
        d = self.layout.unified
        assert d is not None
        d = d / path.strip("/")
        if r.cpu_shares:
            _write(d, "cpu.weight", str(shares_to_weight(r.cpu_shares)))
        if r.cpu_quota or r.cpu_period:
            value = str(r.cpu_quota) if r.cpu_quota > 0 else "max"
            if r.cpu_period:
                value += f" {r.cpu_period}"
            _write(d, "cpu.max", value)
        if r.memory_limit:
            _write(d, "memory.max", _max(r.memory_limit))
        swap = swap_v2(r.memory_swap_limit, r.memory_limit)
        if swap is not None:
            if (d / "memory.swap.max").exists():
                _write(d, "memory.swap.max", _max(swap))
            else:
                log.debug("no memory.swap.max on this host; ignoring swap limit")
        for size, limit in r.hugepage_limits.items():
            if "hugetlb" in self.layout.v2_controllers:
                _write(d, f"hugetlb.{size}.max", str(limit))
        for key, value in sorted(r.unified.items()):
            _write(d, key, value)

    # -- inspect

    def _pids_sync(self, path: str, recursive: bool) -> list[int]:
        base = None
        for controller in ("pids", "memory", "name=systemd", "cpu"):
            base = self._dir(controller, path)
            if base is not None:
                break
        if base is None:
            base = self._dirs(path)[0]
        if not base.is_dir():
            return []
        pids: list[int] = []
        for d in _subtree(base) if recursive else [base]:
            try:
                pids.extend(int(x) for x in (d / "cgroup.procs").read_text().split())
            except FileNotFoundError:
                continue
        return sorted(set(pids))

    async def pids(self, path: str, recursive: bool = True) -> list[int]:
        """Processes in the cgroup (and, by default, its descendants)."""
        return await asyncio.to_thread(self._pids_sync, path, recursive)

    def _stats_sync(self, path: str) -> CgroupStats:
        def rd(controller: str, name: str) -> Path:
            # v2 files exist whenever their controller is enabled; a missing one reads as None.
            base = self.layout.unified if self.layout.is_v2 else self.layout.v1.get(controller)
            return Path("/nonexistent") if base is None else base / path.strip("/") / name

        if self.layout.is_v2:
            cpu = {k: v * 1000 for k, v in _read_kv(rd("cpu", "cpu.stat")).items()}
            return _stats(cpu.get("usage_usec"), cpu.get("user_usec"), cpu.get("system_usec"),
                          _read_int(rd("memory", "memory.current")),
                          _read_int(rd("memory", "memory.max")),
                          _read_kv(rd("memory", "memory.stat")), "",
                          _read_int(rd("pids", "pids.current")))
        return _stats(_read_int(rd("cpuacct", "cpuacct.usage")),
                      _read_int(rd("cpuacct", "cpuacct.usage_user")),
                      _read_int(rd("cpuacct", "cpuacct.usage_sys")),
                      _read_int(rd("memory", "memory.usage_in_bytes")),
                      _read_int(rd("memory", "memory.limit_in_bytes")),
                      _read_kv(rd("memory", "memory.stat")), "total_",
                      _read_int(rd("pids", "pids.current")))

    async def stats(self, path: str) -> CgroupStats:
        return await asyncio.to_thread(self._stats_sync, path)

    def read_stats(self, path: str) -> CgroupStats:
        """`stats` without the thread hop, for callers already off the event loop
        (reading many cgroups in one worker thread)."""
        return self._stats_sync(path)

    def _oom_sync(self, path: str) -> int:
        d = self._dir("memory", path)
        if d is None:
            return 0
        name = "memory.events" if self.layout.is_v2 else "memory.oom_control"
        return _read_kv(d / name).get("oom_kill", 0)

    async def oom_kill_count(self, path: str) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown)."""
        return await asyncio.to_thread(self._oom_sync, path)

    # -- remove

    def _remove_sync(self, path: str) -> None:
        if not path.strip("/"):
            raise InvalidArgument("refusing to remove the root cgroup")
        busy = self._pids_sync(path, True)
        if busy:
            raise FailedPrecondition(f"cgroup {path} still has processes {busy[:10]}")
        deadline = time.monotonic() + _REMOVE_TIMEOUT
        for top in self._dirs(path):
            for d in _subtree(top) if top.is_dir() else []:
                delay = 0.005
                while True:
                    try:
                        _rmdir(d)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        # EBUSY right after the last process left: the kernel frees
                        # the cgroup asynchronously. Anything else is final.
                        if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                            busy = self._pids_sync(path, True)
                            if busy:
                                raise FailedPrecondition(
                                    f"cgroup {path} still has processes {busy[:10]}") from None
                            raise Internal(
                                f"cannot remove cgroup {d}: {exc.strerror}") from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)

    async def remove(self, path: str) -> None:
        """Remove the cgroup and its children in every hierarchy; kills nothing.

        Idempotent. FailedPrecondition when processes are still inside.
        """
        await asyncio.to_thread(self._remove_sync, path)


def _stats(cpu: int | None, user: int | None, system: int | None, usage: int | None,
           limit: int | None, mem: dict[str, int], prefix: str,
           pids: int | None) -> CgroupStats:
    inactive = mem.get(prefix + "inactive_file", 0)
    working = None if usage is None else max(0, usage - inactive)
    rss = mem.get(prefix + "rss" if prefix else "anon")
    return CgroupStats(
        cpu_usage_ns=cpu, cpu_user_ns=user, cpu_system_ns=system,
        memory_usage=usage, memory_working_set=working, memory_rss=rss,
        memory_limit=None if limit is None or limit >= _UNLIMITED else limit,
        page_faults=mem.get(prefix + "pgfault"), major_page_faults=mem.get(prefix + "pgmajfault"),
        pids_current=pids)
