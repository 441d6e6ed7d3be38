"""cAdvisor-compatible metric descriptors and values for the CRI metrics RPCs.

`ListMetricDescriptors` answers `list_descriptors()`; `ListPodSandboxMetrics`
and `StreamPodSandboxMetrics` answer `pod_sandbox_metrics()` built from stats
snapshots (cgroup files, netlink counters, statfs), defined here as plain
dataclasses so that this module stays pure logic.

The names, help strings, metric types and label keys are cAdvisor's, as CRI-O
exposes them through the CRI:

- every metric starts with the label keys ``id``, ``name``, ``image``; the
  values are the container id, the kubelet-style container name
  (``k8s_<container>_<pod>_<namespace>_<uid>_<attempt>``) and the image, or
  ``<sandbox id>, "POD", ""`` for pod-level metrics;
- ``pod``, ``namespace`` and ``container`` are NOT runtime labels: the kubelet
  appends them itself from ListPodSandbox/ListContainers, and a descriptor
  that already had them would clash with its own;
- a few metrics add keys after the base ones: ``cpu`` (usage per CPU or
  ``total``), ``failure_type`` + ``scope`` (page faults), ``interface``
  (network, reported at pod level), ``pagesize`` (hugetlb).

Values travel as UInt64Value, so "seconds" counters are whole seconds
(nanoseconds // 1e9), as CRI-O sends them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from api import api_pb2
from runtimeservice.cgroups import CgroupStats

BASE_LABEL_KEYS = ("id", "name", "image")
POD_NAME = "POD"  # the `name` label value of pod-level metrics

COUNTER = api_pb2.COUNTER
GAUGE = api_pb2.GAUGE

_NS_PER_S = 1_000_000_000
_U64_MAX = 2**64 - 1
_UNLIMITED_MEMORY = 1 << 62  # cAdvisor: anything above is "no limit" and reported as 0


class Group(StrEnum):
    """Metric groups (CRI-O's `included_pod_metrics` names)."""

    MISC = "misc"
    CPU = "cpu"
    MEMORY = "memory"
    OOM = "oom"
    NETWORK = "network"
    DISK = "disk"
    PROCESS = "process"
    SPEC = "spec"
    HUGETLB = "hugetlb"


@dataclass(frozen=True)
class Descriptor:
    name: str
    help: str
    group: Group
    metric_type: api_pb2.MetricType
    extra_labels: tuple[str, ...] = ()

    @property
    def label_keys(self) -> tuple[str, ...]:
        return BASE_LABEL_KEYS + self.extra_labels

    def to_proto(self) -> api_pb2.MetricDescriptor:
        return api_pb2.MetricDescriptor(name=self.name, help=self.help,
                                        label_keys=list(self.label_keys))


def _d(name: str, help_: str, group: Group, mtype: api_pb2.MetricType,
       *extra: str) -> Descriptor:
    return Descriptor(name, help_, group, mtype, tuple(extra))


_G = Group
DESCRIPTORS: tuple[Descriptor, ...] = (
    _d("container_last_seen", "Last time a container was seen by the exporter", _G.MISC, GAUGE),
    _d("container_start_time_seconds", "Start time of the container since unix epoch in seconds.",
       _G.MISC, GAUGE),
    # CPU
    _d("container_cpu_user_seconds_total", "Cumulative user CPU time consumed in seconds.",
       _G.CPU, COUNTER),
    _d("container_cpu_system_seconds_total", "Cumulative system CPU time consumed in seconds.",
       _G.CPU, COUNTER),
    _d("container_cpu_usage_seconds_total", "Cumulative CPU time consumed in seconds.",
       _G.CPU, COUNTER, "cpu"),
    _d("container_cpu_cfs_periods_total", "Number of elapsed enforcement period intervals.",
       _G.CPU, COUNTER),
    _d("container_cpu_cfs_throttled_periods_total", "Number of throttled period intervals.",
       _G.CPU, COUNTER),
    _d("container_cpu_cfs_throttled_seconds_total",
       "Total time duration the container has been throttled.", _G.CPU, COUNTER),
    # Memory
    _d("container_memory_cache", "Number of bytes of page cache memory.", _G.MEMORY, GAUGE),
    _d("container_memory_rss", "Size of RSS in bytes.", _G.MEMORY, GAUGE),
    _d("container_memory_kernel_usage", "Size of kernel memory allocated in bytes.",
       _G.MEMORY, GAUGE),
    _d("container_memory_mapped_file", "Size of memory mapped files in bytes.", _G.MEMORY, GAUGE),
    _d("container_memory_swap", "Container swap usage in bytes.", _G.MEMORY, GAUGE),
    _d("container_memory_failcnt", "Number of memory usage hits limits", _G.MEMORY, COUNTER),
    _d("container_memory_usage_bytes",
       "Current memory usage in bytes, including all memory regardless of when it was accessed",
       _G.MEMORY, GAUGE),
    _d("container_memory_max_usage_bytes", "Maximum memory usage recorded in bytes",
       _G.MEMORY, GAUGE),
    _d("container_memory_working_set_bytes", "Current working set in bytes.", _G.MEMORY, GAUGE),
    _d("container_memory_failures_total", "Cumulative count of memory allocation failures.",
       _G.MEMORY, COUNTER, "failure_type", "scope"),
    _d("container_oom_events_total", "Count of out of memory events observed for the container",
       _G.OOM, COUNTER),
    # Network (pod level: the containers of a pod share its network namespace)
    _d("container_network_receive_bytes_total", "Cumulative count of bytes received",
       _G.NETWORK, COUNTER, "interface"),
    _d("container_network_receive_packets_total", "Cumulative count of packets received",
       _G.NETWORK, COUNTER, "interface"),
    _d("container_network_receive_packets_dropped_total",
       "Cumulative count of packets dropped while receiving", _G.NETWORK, COUNTER, "interface"),
    _d("container_network_receive_errors_total",
       "Cumulative count of errors encountered while receiving", _G.NETWORK, COUNTER, "interface"),
    _d("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted",
       _G.NETWORK, COUNTER, "interface"),
    _d("container_network_transmit_packets_total", "Cumulative count of packets transmitted",
       _G.NETWORK, COUNTER, "interface"),
    _d("container_network_transmit_packets_dropped_total",
       "Cumulative count of packets dropped while transmitting", _G.NETWORK, COUNTER,
       "interface"),
    _d("container_network_transmit_errors_total",
       "Cumulative count of errors encountered while transmitting", _G.NETWORK, COUNTER,
       "interface"),
    # Filesystem (the container's writable layer)
    _d("container_fs_inodes_free", "Number of free inodes.", _G.DISK, GAUGE),
    _d("container_fs_inodes_total", "Total number of inodes.", _G.DISK, GAUGE),
    _d("container_fs_limit_bytes", "Filesystem limit in bytes.", _G.DISK, GAUGE),
    _d("container_fs_usage_bytes", "Current filesystem usage in bytes.", _G.DISK, GAUGE),
    # Processes
    _d("container_processes", "Number of processes running inside the container.",
       _G.PROCESS, GAUGE),
    _d("container_threads", "Number of threads running inside the container", _G.PROCESS, GAUGE),
    _d("container_threads_max",
       "Maximum number of threads allowed inside the container, infinity if value is zero",
       _G.PROCESS, GAUGE),
    _d("container_file_descriptors", "Number of open file descriptors for the container.",
       _G.PROCESS, GAUGE),
    _d("container_sockets", "Number of open sockets for the container.", _G.PROCESS, GAUGE),
    # Spec
    _d("container_spec_memory_limit_bytes", "Memory limit for the container in bytes.",
       _G.SPEC, GAUGE),
    _d("container_spec_memory_reservation_limit_bytes",
       "Memory reservation limit for the container.", _G.SPEC, GAUGE),
    _d("container_spec_memory_swap_limit_bytes", "Memory swap limit for the container.",
       _G.SPEC, GAUGE),
    _d("container_spec_cpu_period", "CPU period of the container.", _G.SPEC, GAUGE),
    _d("container_spec_cpu_shares", "CPU share of the container.", _G.SPEC, GAUGE),
    _d("container_spec_cpu_quota", "CPU quota of the container.", _G.SPEC, GAUGE),
    # Hugetlb
    _d("container_hugetlb_usage_bytes", "Current hugepage usage", _G.HUGETLB, GAUGE, "pagesize"),
    _d("container_hugetlb_max_usage_bytes", "Maximum hugepage usages recorded", _G.HUGETLB,
       GAUGE, "pagesize"),
)
BY_NAME: dict[str, Descriptor] = {d.name: d for d in DESCRIPTORS}
ALL_GROUPS = frozenset(Group)


def list_descriptors(groups: Iterable[Group] = ALL_GROUPS) -> list[api_pb2.MetricDescriptor]:
    """The descriptors of `groups`, for ListMetricDescriptors."""
    wanted = frozenset(groups)
    return [d.to_proto() for d in DESCRIPTORS if d.group in wanted]


# ------------------------------------------------------------------ stats snapshots


@dataclass(frozen=True)
class CpuStats:
    usage_ns: int | None = None
    user_ns: int | None = None
    system_ns: int | None = None
    per_cpu_ns: tuple[int, ...] = ()  # when given, usage is reported per CPU instead of total
    cfs_periods: int | None = None
    cfs_throttled_periods: int | None = None
    cfs_throttled_ns: int | None = None


@dataclass(frozen=True)
class MemoryStats:
    usage: int | None = None
    max_usage: int | None = None
    working_set: int | None = None
    rss: int | None = None
    cache: int | None = None
    swap: int | None = None
    kernel: int | None = None
    mapped_file: int | None = None
    failcnt: int | None = None
    pgfault: int | None = None
    pgmajfault: int | None = None
    # Including descendants; default to the cgroup's own counters (as CRI-O reports them).
    hierarchical_pgfault: int | None = None
    hierarchical_pgmajfault: int | None = None


@dataclass(frozen=True)
class ProcessStats:
    processes: int | None = None
    threads: int | None = None
    threads_max: int | None = None  # 0 = unlimited
    file_descriptors: int | None = None
    sockets: int | None = None


@dataclass(frozen=True)
class InterfaceCounters:
    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


@dataclass(frozen=True)
class FsStats:
    usage_bytes: int | None = None
    limit_bytes: int | None = None
    inodes_total: int | None = None
    inodes_free: int | None = None


@dataclass(frozen=True)
class SpecStats:
    memory_limit_bytes: int | None = None  # None or >= 2**62: unlimited, reported as 0
    memory_reservation_bytes: int | None = None
    memory_swap_limit_bytes: int | None = None
    cpu_shares: int | None = None
    cpu_period: int | None = None
    cpu_quota: int | None = None  # <= 0: no quota, not reported


@dataclass(frozen=True)
class HugetlbUsage:
    pagesize: str  # "2MB", "1GB": the kernel's hugetlb.<size> naming
    usage: int = 0
    max_usage: int = 0


@dataclass(frozen=True)
class StatsSnapshot:
    """What is known about one container (or pod) at `timestamp_ns`; None = not collected."""

    cpu: CpuStats | None = None
    memory: MemoryStats | None = None
    oom_events: int | None = None
    processes: ProcessStats | None = None
    network: tuple[InterfaceCounters, ...] = ()
    fs: FsStats | None = None
    spec: SpecStats | None = None
    hugetlb: tuple[HugetlbUsage, ...] = ()
    start_time_s: int | None = None  # unix seconds
    timestamp_ns: int | None = None  # when collected; now if None


def from_cgroup_stats(cg: CgroupStats) -> StatsSnapshot:
    """A snapshot with the CPU, memory and pids figures of `cg`.

    Add the rest (network, fs, spec...) with `dataclasses.replace`.
    """
    cpu = CpuStats(usage_ns=cg.cpu_usage_ns, user_ns=cg.cpu_user_ns, system_ns=cg.cpu_system_ns)
    memory = MemoryStats(usage=cg.memory_usage, working_set=cg.memory_working_set,
                         rss=cg.memory_rss, pgfault=cg.page_faults,
                         pgmajfault=cg.major_page_faults)
    processes = ProcessStats(processes=cg.pids_current)
    return StatsSnapshot(cpu=cpu, memory=memory, processes=processes)


# ------------------------------------------------------------------ metric values


@dataclass(frozen=True)
class MetricTarget:
    """Whose metrics these are: the values of the base labels (id, name, image)."""

    id: str
    name: str
    image: str = ""

    @classmethod
    def for_sandbox(cls, sandbox_id: str) -> MetricTarget:
        return cls(sandbox_id, POD_NAME, "")

    @classmethod
    def for_container(cls, container_id: str, container_name: str, pod_name: str,
                      namespace: str, pod_uid: str, attempt: int, image: str) -> MetricTarget:
        """The kubelet-style name CRI-O uses: k8s_<container>_<pod>_<namespace>_<uid>_<attempt>."""
        name = f"k8s_{container_name}_{pod_name}_{namespace}_{pod_uid}_{attempt}"
        return cls(container_id, name, image)

    @property
    def label_values(self) -> tuple[str, str, str]:
        return (self.id, self.name, self.image)


def _u64(value: int) -> int:
    return min(max(int(value), 0), _U64_MAX)


def _seconds(ns: int) -> int:
    return _u64(ns) // _NS_PER_S


def _memory_limit(value: int | None) -> int:
    return 0 if value is None or value < 0 or value >= _UNLIMITED_MEMORY else value


class _Builder:
    def __init__(self, target: MetricTarget, groups: frozenset[Group], timestamp_ns: int):
        self.base = list(target.label_values)
        self.groups = groups
        self.ts = timestamp_ns
        self.out: list[api_pb2.Metric] = []

    def wants(self, group: Group) -> bool:
        return group in self.groups

    def add(self, name: str, value: int | None, *extra: str) -> None:
        if value is None:
            return
        desc = BY_NAME[name]
        if len(extra) != len(desc.extra_labels):
            raise ValueError(f"{name} takes labels {desc.extra_labels}, got {extra}")
        self.out.append(api_pb2.Metric(
            name=name, timestamp=self.ts, metric_type=desc.metric_type,
            label_values=[*self.base, *extra], value=api_pb2.UInt64Value(value=_u64(value))))


def _cpu(b: _Builder, cpu: CpuStats) -> None:
    def sec(ns: int | None) -> int | None:
        return None if ns is None else _seconds(ns)

    b.add("container_cpu_user_seconds_total", sec(cpu.user_ns))
    b.add("container_cpu_system_seconds_total", sec(cpu.system_ns))
    if cpu.per_cpu_ns:
        for i, ns in enumerate(cpu.per_cpu_ns):
            b.add("container_cpu_usage_seconds_total", _seconds(ns), f"cpu{i:02d}")
    else:
        b.add("container_cpu_usage_seconds_total", sec(cpu.usage_ns), "total")
    b.add("container_cpu_cfs_periods_total", cpu.cfs_periods)
    b.add("container_cpu_cfs_throttled_periods_total", cpu.cfs_throttled_periods)
    b.add("container_cpu_cfs_throttled_seconds_total", sec(cpu.cfs_throttled_ns))


def _memory(b: _Builder, mem: MemoryStats) -> None:
    b.add("container_memory_cache", mem.cache)
    b.add("container_memory_rss", mem.rss)
    b.add("container_memory_kernel_usage", mem.kernel)
    b.add("container_memory_mapped_file", mem.mapped_file)
    b.add("container_memory_swap", mem.swap)
    b.add("container_memory_failcnt", mem.failcnt)
    b.add("container_memory_usage_bytes", mem.usage)
    b.add("container_memory_max_usage_bytes", mem.max_usage)
    b.add("container_memory_working_set_bytes", mem.working_set)
    faults = (("pgfault", mem.pgfault, mem.hierarchical_pgfault),
              ("pgmajfault", mem.pgmajfault, mem.hierarchical_pgmajfault))
    for kind, own, hierarchy in faults:
        b.add("container_memory_failures_total", own, kind, "container")
        b.add("container_memory_failures_total", own if hierarchy is None else hierarchy,
              kind, "hierarchy")


_NETWORK_FIELDS = (
    ("container_network_receive_bytes_total", "rx_bytes"),
    ("container_network_receive_packets_total", "rx_packets"),
    ("container_network_receive_packets_dropped_total", "rx_dropped"),
    ("container_network_receive_errors_total", "rx_errors"),
    ("container_network_transmit_bytes_total", "tx_bytes"),
    ("container_network_transmit_packets_total", "tx_packets"),
    ("container_network_transmit_packets_dropped_total", "tx_dropped"),
    ("container_network_transmit_errors_total", "tx_errors"),
)


def _network(b: _Builder, interfaces: Iterable[InterfaceCounters]) -> None:
    for iface in interfaces:
        for name, attr in _NETWORK_FIELDS:
            b.add(name, getattr(iface, attr), iface.name)


def _fs(b: _Builder, fs: FsStats) -> None:
    b.add("container_fs_inodes_free", fs.inodes_free)
    b.add("container_fs_inodes_total", fs.inodes_total)
    b.add("container_fs_limit_bytes", fs.limit_bytes)
    b.add("container_fs_usage_bytes", fs.usage_bytes)


def _processes(b: _Builder, p: ProcessStats) -> None:
    b.add("container_processes", p.processes)
    b.add("container_threads", p.threads)
    b.add("container_threads_max", p.threads_max)
    b.add("container_file_descriptors", p.file_descriptors)
    b.add("container_sockets", p.sockets)


def _spec(b: _Builder, s: SpecStats) -> None:
    b.add("container_spec_memory_limit_bytes", _memory_limit(s.memory_limit_bytes))
    if s.memory_reservation_bytes:
        b.add("container_spec_memory_reservation_limit_bytes", s.memory_reservation_bytes)
    if s.memory_swap_limit_bytes is not None:
        b.add("container_spec_memory_swap_limit_bytes", _memory_limit(s.memory_swap_limit_bytes))
    b.add("container_spec_cpu_shares", s.cpu_shares)
    b.add("container_spec_cpu_period", s.cpu_period)
    if s.cpu_quota is not None and s.cpu_quota > 0:
        b.add("container_spec_cpu_quota", s.cpu_quota)


def _fill(b: _Builder, s: StatsSnapshot) -> None:
    if b.wants(Group.MISC):
        b.add("container_last_seen", b.ts // _NS_PER_S)
        b.add("container_start_time_seconds", s.start_time_s)
    if b.wants(Group.CPU) and s.cpu is not None:
        _cpu(b, s.cpu)
    if b.wants(Group.MEMORY) and s.memory is not None:
        _memory(b, s.memory)
    if b.wants(Group.OOM):
        b.add("container_oom_events_total", s.oom_events)
    if b.wants(Group.NETWORK):
        _network(b, s.network)
    if b.wants(Group.DISK) and s.fs is not None:
        _fs(b, s.fs)
    if b.wants(Group.PROCESS) and s.processes is not None:
        _processes(b, s.processes)
    if b.wants(Group.SPEC) and s.spec is not None:
        _spec(b, s.spec)
    if b.wants(Group.HUGETLB):
        for h in s.hugetlb:
            b.add("container_hugetlb_usage_bytes", h.usage, h.pagesize)
            b.add("container_hugetlb_max_usage_bytes", h.max_usage, h.pagesize)


def build_metrics(target: MetricTarget, stats: StatsSnapshot,
                  groups: Iterable[Group] = ALL_GROUPS) -> list[api_pb2.Metric]:
    """The CRI metrics of one container (or pod) from its stats snapshot."""
    ts = stats.timestamp_ns if stats.timestamp_ns is not None else time.time_ns()
    b = _Builder(target, frozenset(groups), ts)
    _fill(b, stats)
    return b.out


@dataclass(frozen=True)
class ContainerSample:
    container_id: str
    target: MetricTarget
    stats: StatsSnapshot


def pod_sandbox_metrics(sandbox_id: str, pod_stats: StatsSnapshot,
                        containers: Iterable[ContainerSample],
                        groups: Iterable[Group] = ALL_GROUPS) -> api_pb2.PodSandboxMetrics:
    """One pod's entry of ListPodSandboxMetrics.

    Pod-level metrics (typically the network, which the containers share) are
    labelled (sandbox id, "POD", ""); each container's carry its own target.
    """
    wanted = frozenset(groups)
    return api_pb2.PodSandboxMetrics(
        pod_sandbox_id=sandbox_id,
        metrics=build_metrics(MetricTarget.for_sandbox(sandbox_id), pod_stats, wanted),
        container_metrics=[
            api_pb2.ContainerMetrics(container_id=c.container_id,
                                     metrics=build_metrics(c.target, c.stats, wanted))
            for c in containers])
