"""cAdvisor-compatible CRI metric descriptors and the metrics built from stats snapshots."""

from __future__ import annotations

import re
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from api import api_pb2
from runtimeservice.cgroups import CgroupStats
from runtimeservice.metric_descriptors import (
    BASE_LABEL_KEYS,
    BY_NAME,
    DESCRIPTORS,
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
    build_metrics,
    from_cgroup_stats,
    list_descriptors,
    pod_sandbox_metrics,
)

TS = 1_700_000_000_123_456_789
S = 1_000_000_000

FULL = StatsSnapshot(
    cpu=CpuStats(usage_ns=8 * S + 999, user_ns=5 * S, system_ns=3 * S, cfs_periods=10,
                 cfs_throttled_periods=2, cfs_throttled_ns=4 * S),
    memory=MemoryStats(usage=1 << 20, max_usage=2 << 20, working_set=1 << 19, rss=1 << 17,
                       cache=1 << 18, swap=0, kernel=4096, mapped_file=8192, failcnt=42,
                       pgfault=100, pgmajfault=5, hierarchical_pgfault=200),
    oom_events=1,
    processes=ProcessStats(processes=3, threads=7, threads_max=0, file_descriptors=12,
                           sockets=2),
    network=(InterfaceCounters("eth0", 1000, 10, 2, 1, 2000, 20, 4, 3),),
    fs=FsStats(usage_bytes=4096, limit_bytes=1 << 30, inodes_total=1000, inodes_free=900),
    spec=SpecStats(memory_limit_bytes=64 << 20, memory_reservation_bytes=32 << 20,
                   memory_swap_limit_bytes=128 << 20, cpu_shares=512, cpu_period=100000,
                   cpu_quota=50000),
    hugetlb=(HugetlbUsage("2MB", 2 << 20, 4 << 20),),
    start_time_s=1_699_999_000,
    timestamp_ns=TS,
)
TARGET = MetricTarget.for_container("c" * 64, "nginx", "web", "default", "uid-1", 0,
                                    "docker.io/library/nginx:latest")


def values(metrics: list[api_pb2.Metric]) -> dict[tuple[str, ...], int]:
    return {(m.name, *m.label_values[3:]): m.value.value for m in metrics}


def test_descriptors_are_well_formed() -> None:
    names = [d.name for d in DESCRIPTORS]
    assert len(names) == len(set(names))
    for d in DESCRIPTORS:
        assert re.fullmatch(r"container_[a-z0-9_]+", d.name), d.name
        assert d.help
        assert d.label_keys[:3] == BASE_LABEL_KEYS
        assert len(set(d.label_keys)) == len(d.label_keys)
        # The kubelet appends these itself; a runtime that sent them would clash.
        assert not {"pod", "namespace", "container"} & set(d.label_keys)
        if d.name.endswith("_total") and d.name != "container_fs_inodes_total":
            assert d.metric_type == api_pb2.COUNTER, d.name  # (inodes_total is a gauge)
    protos = list_descriptors()
    assert [p.name for p in protos] == names
    assert list(protos[0].label_keys) == ["id", "name", "image"]


def test_known_cadvisor_facts() -> None:
    assert BY_NAME["container_cpu_usage_seconds_total"].label_keys == (
        "id", "name", "image", "cpu")
    assert BY_NAME["container_memory_failures_total"].label_keys[3:] == ("failure_type", "scope")
    assert BY_NAME["container_network_receive_bytes_total"].label_keys[3:] == ("interface",)
    assert BY_NAME["container_memory_working_set_bytes"].help == "Current working set in bytes."
    assert BY_NAME["container_memory_working_set_bytes"].metric_type == api_pb2.GAUGE
    assert BY_NAME["container_memory_failcnt"].metric_type == api_pb2.COUNTER


def test_every_metric_matches_its_descriptor_and_every_descriptor_is_produced() -> None:
    metrics = build_metrics(TARGET, FULL)
    for m in metrics:
        desc = BY_NAME[m.name]
        assert len(m.label_values) == len(desc.label_keys), m.name
        assert m.metric_type == desc.metric_type, m.name
        assert m.timestamp == TS
        assert tuple(m.label_values[:3]) == TARGET.label_values
    assert {m.name for m in metrics} == set(BY_NAME)
    # No two series share a name and label values.
    keys = Counter((m.name, tuple(m.label_values)) for m in metrics)
    assert max(keys.values()) == 1


def test_values_follow_cadvisor_conventions() -> None:
    v = values(build_metrics(TARGET, FULL))
    assert v[("container_cpu_usage_seconds_total", "total")] == 8  # whole seconds
    assert v[("container_cpu_user_seconds_total",)] == 5
    assert v[("container_cpu_cfs_throttled_seconds_total",)] == 4
    assert v[("container_memory_working_set_bytes",)] == 1 << 19
    assert v[("container_memory_failures_total", "pgfault", "container")] == 100
    assert v[("container_memory_failures_total", "pgfault", "hierarchy")] == 200
    assert v[("container_memory_failures_total", "pgmajfault", "hierarchy")] == 5
    assert v[("container_network_transmit_packets_dropped_total", "eth0")] == 3
    assert v[("container_network_receive_errors_total", "eth0")] == 2
    assert v[("container_hugetlb_max_usage_bytes", "2MB")] == 4 << 20
    assert v[("container_last_seen",)] == TS // S
    assert v[("container_start_time_seconds",)] == 1_699_999_000
    assert v[("container_spec_memory_limit_bytes",)] == 64 << 20


def test_per_cpu_usage_replaces_total() -> None:
    snap = StatsSnapshot(cpu=CpuStats(usage_ns=3 * S, per_cpu_ns=(1 * S, 2 * S)),
                         timestamp_ns=TS)
    v = values(build_metrics(TARGET, snap, {Group.CPU}))
    assert v == {("container_cpu_usage_seconds_total", "cpu00"): 1,
                 ("container_cpu_usage_seconds_total", "cpu01"): 2}


def test_unlimited_and_missing_values() -> None:
    snap = StatsSnapshot(spec=SpecStats(memory_limit_bytes=None, cpu_shares=2, cpu_quota=-1),
                         memory=MemoryStats(usage=-5), timestamp_ns=TS)
    v = values(build_metrics(TARGET, snap, {Group.SPEC, Group.MEMORY}))
    assert v == {("container_spec_memory_limit_bytes",): 0,  # unlimited reads as 0
                 ("container_spec_cpu_shares",): 2,
                 ("container_memory_usage_bytes",): 0}  # never negative
    huge = StatsSnapshot(spec=SpecStats(memory_limit_bytes=(1 << 63) - 4096), timestamp_ns=TS)
    assert values(build_metrics(TARGET, huge, {Group.SPEC})) == {
        ("container_spec_memory_limit_bytes",): 0}


def test_groups_filter_descriptors_and_values() -> None:
    assert {d.name for d in list_descriptors({Group.NETWORK})} == {
        d.name for d in DESCRIPTORS if d.name.startswith("container_network_")}
    names = {m.name for m in build_metrics(TARGET, FULL, {Group.PROCESS})}
    assert names == {"container_processes", "container_threads", "container_threads_max",
                     "container_file_descriptors", "container_sockets"}


def test_pod_sandbox_metrics_labels() -> None:
    pod_stats = StatsSnapshot(network=FULL.network, timestamp_ns=TS)
    ctr = ContainerSample("c" * 64, TARGET, FULL)
    pm = pod_sandbox_metrics("s" * 64, pod_stats, [ctr], {Group.NETWORK, Group.CPU})
    assert pm.pod_sandbox_id == "s" * 64
    assert pm.metrics and all(list(m.label_values[:3]) == ["s" * 64, "POD", ""]
                              for m in pm.metrics)
    assert {m.name for m in pm.metrics} == {d.name for d in DESCRIPTORS
                                            if d.group is Group.NETWORK}
    [cm] = pm.container_metrics
    assert cm.container_id == "c" * 64
    assert all(m.label_values[1] == "k8s_nginx_web_default_uid-1_0" for m in cm.metrics)
    assert all(m.label_values[2] == "docker.io/library/nginx:latest" for m in cm.metrics)


def test_from_cgroup_stats() -> None:
    cg = CgroupStats(cpu_usage_ns=2 * S, cpu_user_ns=S, cpu_system_ns=S, memory_usage=100,
                     memory_working_set=80, memory_rss=50, page_faults=9, major_page_faults=1,
                     pids_current=4)
    v = values(build_metrics(TARGET, from_cgroup_stats(cg), {Group.CPU, Group.MEMORY,
                                                             Group.PROCESS}))
    assert v[("container_cpu_usage_seconds_total", "total")] == 2
    assert v[("container_memory_working_set_bytes",)] == 80
    assert v[("container_memory_rss",)] == 50
    assert v[("container_memory_failures_total", "pgmajfault", "container")] == 1
    assert v[("container_processes",)] == 4
    assert ("container_memory_cache",) not in v  # unknown stays absent, not zero


def test_kubelet_style_translation_parses() -> None:
    """Do what the kubelet does: descriptor keys + namespace/pod/container, then expose."""
    kubelet_keys = ["namespace", "pod", "container"]
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for d in list_descriptors():
        kind = (CounterMetricFamily if BY_NAME[d.name].metric_type == api_pb2.COUNTER
                else GaugeMetricFamily)
        families[d.name] = kind(d.name, d.help, labels=[*d.label_keys, *kubelet_keys])
    for m in build_metrics(TARGET, FULL):
        families[m.name].add_metric([*m.label_values, "default", "web", "nginx"], m.value.value,
                                    timestamp=m.timestamp / 1e9)

    class Fixed:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    parsed = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    cpu = parsed["container_cpu_usage_seconds"]
    assert cpu.type == "counter"
    [sample] = cpu.samples
    assert sample.labels == {"id": "c" * 64, "name": "k8s_nginx_web_default_uid-1_0",
                             "image": "docker.io/library/nginx:latest", "cpu": "total",
                             "namespace": "default", "pod": "web", "container": "nginx"}
