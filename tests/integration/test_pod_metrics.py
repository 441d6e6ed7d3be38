"""ListMetricDescriptors, ListPodSandboxMetrics and StreamPodSandboxMetrics through a
real daemon: every metric has a descriptor with matching labels, and the values
for a running container and its pod agree with their cgroup files, the writable
layer and the pod's network namespace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from api import api_pb2
from runtimeservice import cgroups
from runtimeservice.service import RuntimeService
from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import (
    CtrCrib,
    container_config,
    create,
    ctr_crib,
    exec_sync,
    info,
    pull,
    remove,
    sandbox,
    start,
)
from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration
__all__ = ["ctr_crib"]

if not hasattr(RuntimeService, "ListPodSandboxMetrics"):
    pytest.skip("the metrics RPCs are not mixed into RuntimeService yet",
                allow_module_level=True)

MiB = 1 << 20
Values = dict[tuple[str, ...], int]  # (name, *extra label values) -> value


def descriptors(d: Daemon) -> dict[str, api_pb2.MetricDescriptor]:
    found = d.runtime.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest()).descriptors
    by_name = {m.name: m for m in found}
    assert len(by_name) == len(found), "duplicate descriptor names"
    return by_name


def values(metrics: list[api_pb2.Metric], descs: dict[str, api_pb2.MetricDescriptor],
           base: list[str]) -> Values:
    out: Values = {}
    for m in metrics:
        keys = list(descs[m.name].label_keys)  # KeyError: a metric without a descriptor
        assert len(m.label_values) == len(keys), m
        assert list(m.label_values[:3]) == base, m
        assert m.timestamp > 0
        out[(m.name, *m.label_values[3:])] = m.value.value
    return out


def cgroup_dir(controller: str, cgroup: str) -> Path:
    base = cgroups.detect().controller_dir(controller)
    assert base is not None, f"no {controller} hierarchy"
    return base / cgroup.strip("/")


def read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


def read_kv(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def netns_counters(netns: str, ifname: str) -> dict[str, int]:
    out = subprocess.run(["nsenter", f"--net={netns}", "cat", "/proc/net/dev"], check=True,
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            f = [int(x) for x in rest.split()]
            return {"rx_bytes": f[0], "rx_packets": f[1], "rx_errors": f[2], "rx_dropped": f[3],
                    "tx_bytes": f[8], "tx_packets": f[9], "tx_errors": f[10],
                    "tx_dropped": f[11]}
    raise AssertionError(f"no {ifname} in {netns}")


def between(value: int, before: int, after: int, slack: int = 0) -> bool:
    return min(before, after) - slack <= value <= max(before, after) + slack


def test_metrics_agree_with_cgroup_files(ctr_crib: CtrCrib,
                                         test_registry: SeededRegistry) -> None:
    d = ctr_crib()
    image = pull(d, test_registry.ref("busybox"))
    sid, pod = sandbox(d, "metrics")
    config = container_config("m", image, ["sleep", "1000"])
    res = config.linux.resources
    res.cpu_shares, res.cpu_period, res.cpu_quota = 512, 100_000, 50_000
    res.memory_limit_in_bytes = 64 * MiB
    cid = create(d, sid, pod, config)
    start(d, cid)
    assert exec_sync(d, cid, ["dd", "if=/dev/zero", "of=/blob", "bs=1048576",
                              "count=2"]).exit_code == 0
    descs = descriptors(d)
    for desc in descs.values():
        assert list(desc.label_keys[:3]) == ["id", "name", "image"] and desc.help
        assert not {"pod", "namespace", "container"} & set(desc.label_keys)

    cg = str(info(d, cid)["cgroup"])
    pod_info = json.loads(d.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(
        pod_sandbox_id=sid, verbose=True)).info["info"])
    pod_cg, netns = str(pod_info["cgroup"]), str(pod_info["netNamespacePath"])
    mem, cpu, acct = (cgroup_dir(c, cg) for c in ("memory", "cpu", "cpuacct"))

    def sample() -> dict[str, int]:
        return {"usage": read_int(mem / "memory.usage_in_bytes"),
                "cpu": read_int(acct / "cpuacct.usage"),
                "max_usage": read_int(mem / "memory.max_usage_in_bytes"),
                **{f"net_{k}": v for k, v in netns_counters(netns, "eth0").items()}}

    before = sample()
    found = d.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest()).pod_metrics
    after = sample()
    [entry] = [p for p in found if p.pod_sandbox_id == sid]
    [ctr] = entry.container_metrics
    assert ctr.container_id == cid
    name = f"k8s_m_metrics_{pod.metadata.namespace}_{pod.metadata.uid}_0"
    v = values(list(ctr.metrics), descs, [cid, name, image])

    # Limits: exactly the files.
    assert v[("container_spec_memory_limit_bytes",)] == read_int(mem / "memory.limit_in_bytes")
    assert v[("container_spec_memory_limit_bytes",)] == 64 * MiB
    assert v[("container_spec_cpu_shares",)] == read_int(cpu / "cpu.shares") == 512
    assert v[("container_spec_cpu_quota",)] == read_int(cpu / "cpu.cfs_quota_us") == 50_000
    assert v[("container_spec_cpu_period",)] == read_int(cpu / "cpu.cfs_period_us")
    # Counters and gauges: what the files said around the call.
    stat = read_kv(mem / "memory.stat")
    assert between(v[("container_memory_usage_bytes",)], before["usage"], after["usage"], MiB)
    assert between(v[("container_memory_max_usage_bytes",)], before["max_usage"],
                   after["max_usage"])
    assert between(v[("container_memory_working_set_bytes",)],
                   before["usage"] - stat["total_inactive_file"],
                   after["usage"] - stat["total_inactive_file"], MiB)
    assert v[("container_memory_failcnt",)] == read_int(mem / "memory.failcnt")
    assert abs(v[("container_memory_rss",)] - stat["total_rss"]) <= MiB
    assert v[("container_oom_events_total",)] == read_kv(mem / "memory.oom_control")["oom_kill"]
    assert between(v[("container_cpu_usage_seconds_total", "total")],
                   before["cpu"] // 10**9, after["cpu"] // 10**9)
    throttled = read_kv(cpu / "cpu.stat")
    assert v[("container_cpu_cfs_periods_total",)] <= throttled["nr_periods"]
    procs = cgroup_dir("pids", cg) / "cgroup.procs"
    assert v[("container_processes",)] == len(procs.read_text().split()) == 1
    assert v[("container_threads",)] == len((cgroup_dir("pids", cg) / "tasks").read_text()
                                            .split())
    assert v[("container_file_descriptors",)] >= 3  # sleep's stdio
    assert v[("container_fs_usage_bytes",)] >= 2 * MiB  # the blob in the writable layer
    assert v[("container_fs_limit_bytes",)] >= v[("container_fs_usage_bytes",)]
    assert v[("container_start_time_seconds",)] > 0
    faults = v[("container_memory_failures_total", "pgfault", "hierarchy")]
    assert faults >= v[("container_memory_failures_total", "pgfault", "container")] > 0

    # The pod: its own cgroup, and the interfaces of its network namespace.
    pv = values(list(entry.metrics), descs, [sid, "POD", ""])
    pod_cpu = cgroup_dir("cpu", pod_cg)
    assert pv[("container_spec_cpu_shares",)] == read_int(pod_cpu / "cpu.shares")
    pod_procs = [p for f in cgroup_dir("pids", pod_cg).rglob("cgroup.procs")
                 for p in f.read_text().split()]
    assert pv[("container_processes",)] == len(pod_procs) == 1  # below: the container's
    for key in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets", "rx_dropped", "tx_errors"):
        direction = "receive" if key.startswith("rx") else "transmit"
        kind = {"bytes": "bytes", "packets": "packets", "dropped": "packets_dropped",
                "errors": "errors"}[key[3:]]
        metric = f"container_network_{direction}_{kind}_total"
        assert between(pv[(metric, "eth0")], before[f"net_{key}"], after[f"net_{key}"]), metric
    assert not any(name.startswith("container_network") for name, *_ in v)

    # The stream: the same pods and containers, the same metric names.
    streamed = [p for resp in d.runtime.StreamPodSandboxMetrics(
        api_pb2.StreamPodSandboxMetricsRequest()) for p in resp.pod_sandbox_metrics]
    assert [p.pod_sandbox_id for p in streamed] == [p.pod_sandbox_id for p in found]

    def names(p: api_pb2.PodSandboxMetrics) -> set[str]:
        return {m.name for c in p.container_metrics for m in c.metrics}

    [again] = [p for p in streamed if p.pod_sandbox_id == sid]
    assert names(again) == names(entry)
    remove(d, cid)
    after_remove = d.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest())
    assert [list(p.container_metrics) for p in after_remove.pod_metrics
            if p.pod_sandbox_id == sid] == [[]]
