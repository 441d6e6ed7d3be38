"""cAdvisor-style metrics of pods and containers, read from their cgroup files,
their writable layers and the pods' network namespaces (ListPodSandboxMetrics).

What is read, per cgroup (v1 file / v2 file), as cAdvisor reads it:

  cpu        cpuacct.usage, .usage_user, .usage_sys, cpu.stat nr_periods,
             nr_throttled, throttled_time / cpu.stat usage_usec, user_usec,
             system_usec, nr_periods, nr_throttled, throttled_usec
  memory     memory.usage_in_bytes, .max_usage_in_bytes, .failcnt,
             .kmem.usage_in_bytes, memory.stat total_cache, total_rss,
             total_mapped_file, total_swap, pgfault/total_pgfault... /
             memory.current, .peak, .swap.current, memory.events max,
             memory.stat file, anon, file_mapped, kernel, pgfault...;
             working set = usage - inactive file pages
  oom        memory.oom_control / memory.events `oom_kill`
  process    the processes of the cgroup (and below): count, threads, open
             file descriptors and sockets (from /proc), pids.max
  spec       memory.limit_in_bytes, .soft_limit_in_bytes,
             .memsw.limit_in_bytes, cpu.shares, cpu.cfs_period_us,
             cpu.cfs_quota_us / memory.max, .low, .swap.max, cpu.weight
             (as shares), cpu.max
  hugetlb    hugetlb.<size>.usage_in_bytes, .max_usage_in_bytes /
             hugetlb.<size>.current

Containers add their writable layer (disk); pods add the counters of the
interfaces in their network namespace (the containers share it). A file that
does not exist (a controller not mounted, an older kernel) leaves its metrics
out rather than reporting zero. Every cgroup file of one call is read in one
worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from api import api_pb2
from runtimeservice import rootfs
from runtimeservice.cgroups import CgroupLayout
from runtimeservice.container import ContainerRecord
from runtimeservice.metric_descriptors import (
    ALL_GROUPS,
    ContainerSample,
    CpuStats,
    FsStats,
    Group,
    HugetlbUsage,
    InterfaceCounters,
    MemoryStats,
    MetricTarget,
    ProcessStats,
    SpecStats,
    StatsSnapshot,
    pod_sandbox_metrics,
)
from runtimeservice.namespaces import NamespaceKind, run_in_namespaces
from runtimeservice.sandbox import SandboxRecord

log = logging.getLogger(__name__)

_NS_PER_S = 1_000_000_000
_HUGETLB_V1 = re.compile(r"^hugetlb\.([0-9]+[KMG]B)\.usage_in_bytes$")
_HUGETLB_V2 = re.compile(r"^hugetlb\.([0-9]+[KMG]B)\.current$")


# ------------------------------------------------------------------ file readers


def _int(path: Path) -> int | None:
    """An integer file; None when missing or "max"."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _kv(path: Path) -> dict[str, int]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in lines:
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value.strip())
    return out


def _subtree(top: Path) -> list[Path]:
    dirs = [top]
    for root, subdirs, _ in os.walk(top):
        dirs.extend(Path(root) / d for d in subdirs)
    return dirs


def _ids(directory: Path, name: str) -> list[int]:
    found: list[int] = []
    for d in _subtree(directory):
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(x) for x in (d / name).read_text().split())
    return found


def _fd_counts(pids: Iterable[int]) -> tuple[int, int]:
    """Open file descriptors and sockets of `pids` (processes gone meanwhile count 0)."""
    fds = sockets = 0
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        fds += len(names)
        for name in names:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                    sockets += 1
    return fds, sockets


def weight_to_shares(weight: int) -> int:
    """cgroup v2 cpu.weight as v1 cpu.shares (the inverse of the OCI conversion)."""
    return 2 + (weight - 1) * 262142 // 9999


@dataclass(frozen=True)
class CgroupReader:
    """Reads one cgroup's files (v1 or v2) into a stats snapshot. Blocking."""

    layout: CgroupLayout

    def _dir(self, controller: str, cgroup: str) -> Path | None:
        base = self.layout.controller_dir(controller)
        if base is None and self.layout.is_v2:
            base = self.layout.unified  # v2 core files exist without any controller
        return None if base is None else base / cgroup.strip("/")

    def _file(self, controller: str, cgroup: str, name: str) -> Path:
        d = self._dir(controller, cgroup)
        return Path("/nonexistent") / name if d is None else d / name

    def snapshot(self, cgroup: str, start_time_ns: int = 0) -> StatsSnapshot:
        v2 = self.layout.is_v2
        return StatsSnapshot(
            cpu=self._cpu_v2(cgroup) if v2 else self._cpu_v1(cgroup),
            memory=self._memory_v2(cgroup) if v2 else self._memory_v1(cgroup),
            oom_events=_kv(self._file("memory", cgroup, "memory.events" if v2 else
                                      "memory.oom_control")).get("oom_kill"),
            processes=self._processes(cgroup),
            spec=self._spec_v2(cgroup) if v2 else self._spec_v1(cgroup),
            hugetlb=self._hugetlb(cgroup),
            start_time_s=start_time_ns // _NS_PER_S if start_time_ns else None)

    # -- cpu

    def _cpu_v1(self, cg: str) -> CpuStats:
        stat = _kv(self._file("cpu", cg, "cpu.stat"))
        return CpuStats(
            usage_ns=_int(self._file("cpuacct", cg, "cpuacct.usage")),
            user_ns=_int(self._file("cpuacct", cg, "cpuacct.usage_user")),
            system_ns=_int(self._file("cpuacct", cg, "cpuacct.usage_sys")),
            cfs_periods=stat.get("nr_periods"), cfs_throttled_periods=stat.get("nr_throttled"),
            cfs_throttled_ns=stat.get("throttled_time"))

    def _cpu_v2(self, cg: str) -> CpuStats:
        stat = _kv(self._file("cpu", cg, "cpu.stat"))

        def ns(key: str) -> int | None:
            value = stat.get(key)
            return None if value is None else value * 1000

        return CpuStats(usage_ns=ns("usage_usec"), user_ns=ns("user_usec"),
                        system_ns=ns("system_usec"), cfs_periods=stat.get("nr_periods"),
                        cfs_throttled_periods=stat.get("nr_throttled"),
                        cfs_throttled_ns=ns("throttled_usec"))

    # -- memory

    def _memory_v1(self, cg: str) -> MemoryStats | None:
        def f(name: str) -> Path:
            return self._file("memory", cg, name)

        usage = _int(f("memory.usage_in_bytes"))
        if usage is None:
            return None
        st = _kv(f("memory.stat"))
        return MemoryStats(
            usage=usage, max_usage=_int(f("memory.max_usage_in_bytes")),
            working_set=max(0, usage - st.get("total_inactive_file", 0)),
            rss=st.get("total_rss"), cache=st.get("total_cache"), swap=st.get("total_swap"),
            kernel=_int(f("memory.kmem.usage_in_bytes")),
            mapped_file=st.get("total_mapped_file"), failcnt=_int(f("memory.failcnt")),
            pgfault=st.get("pgfault"), pgmajfault=st.get("pgmajfault"),
            hierarchical_pgfault=st.get("total_pgfault"),
            hierarchical_pgmajfault=st.get("total_pgmajfault"))

    def _memory_v2(self, cg: str) -> MemoryStats | None:
        def f(name: str) -> Path:
            return self._file("memory", cg, name)

        usage = _int(f("memory.current"))
        if usage is None:
            return None
        st = _kv(f("memory.stat"))
        kernel = st.get("kernel")
        if kernel is None and "kernel_stack" in st:
            kernel = st["kernel_stack"] + st.get("slab", 0) + st.get("sock", 0)
        return MemoryStats(
            usage=usage, max_usage=_int(f("memory.peak")),
            working_set=max(0, usage - st.get("inactive_file", 0)), rss=st.get("anon"),
            cache=st.get("file"), swap=_int(f("memory.swap.current")), kernel=kernel,
            mapped_file=st.get("file_mapped"), failcnt=_kv(f("memory.events")).get("max"),
            pgfault=st.get("pgfault"), pgmajfault=st.get("pgmajfault"))

    # -- processes

    def _processes(self, cg: str) -> ProcessStats | None:
        d = self._dir("pids", cg) or self._dir("memory", cg)
        if d is None or not d.is_dir():
            return None
        pids = sorted(set(_ids(d, "cgroup.procs")))
        threads = len(_ids(d, "cgroup.threads" if self.layout.is_v2 else "tasks"))
        fds, sockets = _fd_counts(pids)
        limit = self._file("pids", cg, "pids.max")
        threads_max = (_int(limit) or 0) if limit.exists() else None  # "max": 0, unlimited
        return ProcessStats(processes=len(pids), threads=threads, threads_max=threads_max,
                            file_descriptors=fds, sockets=sockets)

    # -- spec

    def _spec_v1(self, cg: str) -> SpecStats:
        def mem(name: str) -> int | None:
            return _int(self._file("memory", cg, name))

        def cpu(name: str) -> int | None:
            return _int(self._file("cpu", cg, name))

        return SpecStats(memory_limit_bytes=mem("memory.limit_in_bytes"),
                         memory_reservation_bytes=mem("memory.soft_limit_in_bytes"),
                         memory_swap_limit_bytes=mem("memory.memsw.limit_in_bytes"),
                         cpu_shares=cpu("cpu.shares"), cpu_period=cpu("cpu.cfs_period_us"),
                         cpu_quota=cpu("cpu.cfs_quota_us"))

    def _spec_v2(self, cg: str) -> SpecStats:
        def mem(name: str) -> int | None:
            return _int(self._file("memory", cg, name))

        weight = _int(self._file("cpu", cg, "cpu.weight"))
        quota: int | None = None
        period: int | None = None
        with contextlib.suppress(OSError, ValueError):
            fields = self._file("cpu", cg, "cpu.max").read_text().split()
            quota = None if fields[0] == "max" else int(fields[0])
            period = int(fields[1]) if len(fields) > 1 else None
        return SpecStats(memory_limit_bytes=mem("memory.max"),
                         memory_reservation_bytes=mem("memory.low"),
                         memory_swap_limit_bytes=mem("memory.swap.max"),
                         cpu_shares=None if weight is None else weight_to_shares(weight),
                         cpu_period=period, cpu_quota=quota)

    # -- hugetlb

    def _hugetlb(self, cg: str) -> tuple[HugetlbUsage, ...]:
        d = self._dir("hugetlb", cg)
        if d is None or not d.is_dir():
            return ()
        pattern = _HUGETLB_V2 if self.layout.is_v2 else _HUGETLB_V1
        out = []
        for name in sorted(os.listdir(d)):
            m = pattern.match(name)
            if m is None:
                continue
            size = m[1]
            usage = _int(d / name) or 0
            peak = 0 if self.layout.is_v2 else _int(d / f"hugetlb.{size}.max_usage_in_bytes")
            out.append(HugetlbUsage(pagesize=size, usage=usage, max_usage=peak or 0))
        return tuple(out)


# ------------------------------------------------------------------ network


def _link_counters(ipr: Any) -> list[InterfaceCounters]:
    out = []
    for msg in ipr.get_links():
        name = msg.get("IFLA_IFNAME")
        if not name or name == "lo":
            continue
        st = msg.get("IFLA_STATS64") or msg.get("IFLA_STATS") or {}

        def g(key: str, st: Any = st) -> int:
            return int(st.get(key, 0))

        out.append(InterfaceCounters(
            name=name, rx_bytes=g("rx_bytes"), rx_packets=g("rx_packets"),
            rx_errors=g("rx_errors"), rx_dropped=g("rx_dropped"), tx_bytes=g("tx_bytes"),
            tx_packets=g("tx_packets"), tx_errors=g("tx_errors"), tx_dropped=g("tx_dropped")))
    return out


async def interface_counters(netns: str) -> tuple[InterfaceCounters, ...]:
    """The counters of every interface but lo in the pinned network namespace `netns`."""
    from pyroute2 import IPRoute

    def query() -> list[InterfaceCounters]:
        ipr = IPRoute()
        try:
            return _link_counters(ipr)
        finally:
            ipr.close()

    return tuple(await run_in_namespaces({NamespaceKind.NET: Path(netns)}, query))


# ------------------------------------------------------------------ collector


def container_target(rec: ContainerRecord, sandbox: SandboxRecord) -> MetricTarget:
    config = rec.container_config()
    meta = sandbox.metadata
    return MetricTarget.for_container(
        rec.id, config.metadata.name, meta.name, meta.namespace, meta.uid,
        config.metadata.attempt, config.image.user_specified_image or config.image.image)


class MetricsCollector:
    """Builds ListPodSandboxMetrics' entries from what the host says right now."""

    def __init__(self, layout: CgroupLayout, layer_fs: str,
                 groups: Iterable[Group] = ALL_GROUPS) -> None:
        self.reader = CgroupReader(layout)
        self.layer_fs = layer_fs
        self.groups = frozenset(groups)

    def _fs(self, rec: ContainerRecord) -> FsStats | None:
        try:
            used, _ = rootfs.usage(rec.paths)
            vfs = os.statvfs(self.layer_fs)
        except OSError:
            return None
        return FsStats(usage_bytes=used, limit_bytes=vfs.f_blocks * vfs.f_frsize,
                       inodes_total=vfs.f_files, inodes_free=vfs.f_ffree)

    def _read(self, pods: Sequence[tuple[SandboxRecord, Sequence[ContainerRecord]]]
              ) -> list[tuple[StatsSnapshot, list[ContainerSample]]]:
        out = []
        for sandbox, recs in pods:
            pod = self.reader.snapshot(sandbox.cgroup, sandbox.created_at)
            samples = []
            for rec in recs:
                snap = self.reader.snapshot(rec.cgroup, rec.created_at)
                if Group.DISK in self.groups:
                    snap = replace(snap, fs=self._fs(rec))
                samples.append(ContainerSample(rec.id, container_target(rec, sandbox), snap))
            out.append((pod, samples))
        return out

    async def _network(self, sandbox: SandboxRecord) -> tuple[InterfaceCounters, ...]:
        if not sandbox.netns or Group.NETWORK not in self.groups:
            return ()
        try:
            return await interface_counters(sandbox.netns)
        except Exception as exc:  # torn down meanwhile: no network metrics
            log.debug("sandbox %s: no interface counters: %s", sandbox.id[:12], exc)
            return ()

    async def pods(self, pods: Sequence[tuple[SandboxRecord, Sequence[ContainerRecord]]]
                   ) -> list[api_pb2.PodSandboxMetrics]:
        """One entry per (sandbox, its live containers), in the order given."""
        read = asyncio.to_thread(self._read, pods)
        nets = asyncio.gather(*(self._network(s) for s, _ in pods))
        snapshots, networks = await asyncio.gather(read, nets)
        out = []
        for (sandbox, _), (pod, samples), net in zip(pods, snapshots, networks, strict=True):
            out.append(pod_sandbox_metrics(sandbox.id, replace(pod, network=net), samples,
                                           self.groups))
        return out
