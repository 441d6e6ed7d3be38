"""Container and pod sandbox stats from cgroups (v1 or v2), the writable layers
and the pods' network namespaces.

CPU: cumulative `usage_core_nano_seconds` from the cgroup, and
`usage_nano_cores` from two samples of it kept per container (and per pod):
the rate between the previous sample and this one, once they are at least
`MIN_WINDOW` apart (closer calls reuse the last rate). The first call for an
object has no rate yet. Memory: working set (usage minus inactive file
pages), usage, RSS, page faults, and available bytes under a limit. The
writable layer: bytes and inodes of the overlay's upper directory. Pods add
their cgroup's totals, a process count and the counters of the interfaces in
their network namespace.

Every file is read in one worker thread per call, not one per container.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from api import api_pb2
from runtimeservice import netlink, rootfs
from runtimeservice.cgroups import CgroupManager, CgroupStats
from runtimeservice.container import ContainerRecord
from runtimeservice.netlink import InterfaceStats
from runtimeservice.sandbox import SandboxRecord

log = logging.getLogger(__name__)

MIN_WINDOW = 100_000_000  # ns between the two CPU samples of a rate
DEFAULT_INTERFACE = "eth0"


def _u64(value: int | None) -> api_pb2.UInt64Value | None:
    return None if value is None else api_pb2.UInt64Value(value=max(0, value))


@dataclass
class _Sample:
    at: int  # ns
    cpu: int  # ns of CPU time
    rate: int | None = None


@dataclass(frozen=True)
class _Raw:
    at: int
    cgroup: CgroupStats
    layer: tuple[int, int] | None  # bytes, inodes


class StatsCollector:
    """Builds ContainerStats / PodSandboxStats; remembers the last CPU samples."""

    def __init__(self, cgroups: CgroupManager, layer_fs: str) -> None:
        self.cgroups = cgroups
        self.layer_fs = layer_fs  # FilesystemIdentifier.mountpoint of the writable layers
        self._samples: dict[str, _Sample] = {}

    def forget(self, key: str) -> None:
        self._samples.pop(key, None)

    def _rate(self, key: str, at: int, cpu: int | None) -> int | None:
        if cpu is None:
            return None
        prev = self._samples.get(key)
        if prev is None or cpu < prev.cpu:
            self._samples[key] = _Sample(at, cpu)
            return None
        if at - prev.at < MIN_WINDOW:
            return prev.rate
        rate = (cpu - prev.cpu) * 1_000_000_000 // (at - prev.at)
        self._samples[key] = _Sample(at, cpu, rate)
        return rate

    # -- reading (worker thread)

    def _read(self, rec: ContainerRecord) -> _Raw:
        stats = self.cgroups.read_stats(rec.cgroup)
        try:
            layer: tuple[int, int] | None = rootfs.usage(rec.paths)
        except OSError:
            layer = None
        return _Raw(time.time_ns(), stats, layer)

    def _read_many(self, records: Sequence[ContainerRecord]) -> list[_Raw]:
        return [self._read(r) for r in records]

    # -- messages

    def _cpu(self, key: str, at: int, st: CgroupStats) -> api_pb2.CpuUsage:
        return api_pb2.CpuUsage(timestamp=at, usage_core_nano_seconds=_u64(st.cpu_usage_ns),
                                usage_nano_cores=_u64(self._rate(key, at, st.cpu_usage_ns)))

    @staticmethod
    def _memory(at: int, st: CgroupStats) -> api_pb2.MemoryUsage:
        available = None
        if st.memory_limit is not None and st.memory_working_set is not None:
            available = st.memory_limit - st.memory_working_set
        return api_pb2.MemoryUsage(
            timestamp=at, working_set_bytes=_u64(st.memory_working_set),
            available_bytes=_u64(available), usage_bytes=_u64(st.memory_usage),
            rss_bytes=_u64(st.memory_rss), page_faults=_u64(st.page_faults),
            major_page_faults=_u64(st.major_page_faults))

    def _container(self, rec: ContainerRecord, raw: _Raw) -> api_pb2.ContainerStats:
        config = rec.container_config()
        out = api_pb2.ContainerStats(
            attributes=api_pb2.ContainerAttributes(
                id=rec.id, metadata=config.metadata, labels=rec.labels,
                annotations=rec.annotations),
            cpu=self._cpu(rec.id, raw.at, raw.cgroup),
            memory=self._memory(raw.at, raw.cgroup))
        if raw.layer is not None:
            out.writable_layer.CopyFrom(api_pb2.FilesystemUsage(
                timestamp=raw.at, fs_id=api_pb2.FilesystemIdentifier(mountpoint=self.layer_fs),
                used_bytes=api_pb2.UInt64Value(value=raw.layer[0]),
                inodes_used=api_pb2.UInt64Value(value=raw.layer[1])))
        return out

    async def containers(self, records: Sequence[ContainerRecord]) -> list[api_pb2.ContainerStats]:
        raws = await asyncio.to_thread(self._read_many, records)
        return [self._container(r, raw) for r, raw in zip(records, raws, strict=True)]

    async def pod(self, sandbox: SandboxRecord, records: Sequence[ContainerRecord]
                  ) -> api_pb2.PodSandboxStats:
        def read() -> tuple[int, CgroupStats, list[_Raw]]:
            return time.time_ns(), self.cgroups.read_stats(sandbox.cgroup), \
                self._read_many(records)

        at, st, raws = await asyncio.to_thread(read)
        pod = sandbox.pod_config()
        linux = api_pb2.LinuxPodSandboxStats(
            cpu=self._cpu("pod:" + sandbox.id, at, st), memory=self._memory(at, st),
            containers=[self._container(r, raw) for r, raw in zip(records, raws, strict=True)])
        count = st.pids_current
        if count is None:
            count = len(await self.cgroups.pids(sandbox.cgroup))
        linux.process.CopyFrom(api_pb2.ProcessUsage(
            timestamp=at, process_count=api_pb2.UInt64Value(value=count)))
        network = await self._network(sandbox, at)
        if network is not None:
            linux.network.CopyFrom(network)
        return api_pb2.PodSandboxStats(
            attributes=api_pb2.PodSandboxAttributes(
                id=sandbox.id, metadata=pod.metadata, labels=pod.labels,
                annotations=pod.annotations),
            linux=linux)

    @staticmethod
    async def _network(sandbox: SandboxRecord, at: int) -> api_pb2.NetworkUsage | None:
        if not sandbox.netns:
            return None
        try:
            found = await netlink.interface_stats(Path(sandbox.netns))
        except Exception as exc:  # a netns torn down meanwhile: no network stats
            log.debug("sandbox %s: no interface stats: %s", sandbox.id[:12], exc)
            return None

        def usage(s: InterfaceStats) -> api_pb2.NetworkInterfaceUsage:
            return api_pb2.NetworkInterfaceUsage(
                name=s.name, rx_bytes=_u64(s.rx_bytes), rx_errors=_u64(s.rx_errors),
                tx_bytes=_u64(s.tx_bytes), tx_errors=_u64(s.tx_errors))

        net = api_pb2.NetworkUsage(timestamp=at, interfaces=[usage(s) for s in found])
        default = next((s for s in found if s.name == DEFAULT_INTERFACE), None)
        if default is not None:
            net.default_interface.CopyFrom(usage(default))
        return net

    def forget_pod(self, sandbox_id: str) -> None:
        self.forget("pod:" + sandbox_id)
