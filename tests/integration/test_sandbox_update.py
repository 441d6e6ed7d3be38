"""UpdatePodSandboxResources through a real daemon: the pod cgroup's files change live."""

from __future__ import annotations

import os

import grpc
import pytest

from api import api_pb2
from runtimeservice import cgroups
from tests.integration.conftest import PodCrib
from tests.integration.daemon import Daemon
from tests.integration.test_sandbox_run import POD, info, pod_config, remove, run, stop

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

Res = api_pb2.LinuxContainerResources
MiB = 1 << 20


def update(d: Daemon, sid: str, resources: Res | None = None,
           overhead: Res | None = None) -> None:
    req = api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id=sid)
    if resources is not None:
        req.resources.CopyFrom(resources)
    if overhead is not None:
        req.overhead.CopyFrom(overhead)
    d.runtime.UpdatePodSandboxResources(req)


def limits(cgroup: str) -> dict[str, str]:
    """memory, quota, period and shares (v1 names) as the pod cgroup's files say."""
    layout = cgroups.detect()
    rel = cgroup.strip("/")
    if layout.is_v2:
        d = layout.root / rel
        quota, period = (d / "cpu.max").read_text().split()
        return {"memory": (d / "memory.max").read_text().strip(), "quota": quota,
                "period": period, "weight": (d / "cpu.weight").read_text().strip()}
    cpu, mem = layout.v1["cpu"] / rel, layout.v1["memory"] / rel
    return {"memory": (mem / "memory.limit_in_bytes").read_text().strip(),
            "quota": (cpu / "cpu.cfs_quota_us").read_text().strip(),
            "period": (cpu / "cpu.cfs_period_us").read_text().strip(),
            "shares": (cpu / "cpu.shares").read_text().strip()}


def expected(memory: int, quota: int, shares: int) -> dict[str, str]:
    if cgroups.detect().is_v2:
        return {"memory": str(memory), "quota": str(quota), "period": "100000",
                "weight": str(cgroups.shares_to_weight(shares))}
    return {"memory": str(memory), "quota": str(quota), "period": "100000",
            "shares": str(shares)}


def code_of(d: Daemon, sid: str, resources: Res) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        update(d, sid, resources)
    return err.value.code()


def test_update_changes_the_pod_cgroup_live_and_survives_a_restart(pod_crib: PodCrib) -> None:
    d = pod_crib()
    config = pod_config("resized", pid=POD)  # with an infra process in a child cgroup
    config.linux.resources.CopyFrom(Res(memory_limit_in_bytes=64 * MiB, cpu_quota=50_000,
                                        cpu_period=100_000, cpu_shares=256))
    config.linux.overhead.CopyFrom(Res(memory_limit_in_bytes=16 * MiB, cpu_quota=10_000,
                                       cpu_period=100_000, cpu_shares=64))
    sid = run(d, config)
    cgroup = str(info(d, sid)["cgroup"])
    assert limits(cgroup) == expected(80 * MiB, 60_000, 320)

    update(d, sid, Res(memory_limit_in_bytes=128 * MiB, cpu_quota=100_000, cpu_period=100_000,
                       cpu_shares=512))  # the overhead stays: added to the new values
    assert limits(cgroup) == expected(144 * MiB, 110_000, 576)
    assert info(d, sid)["resources"] == {"memoryLimitInBytes": str(128 * MiB),
                                         "cpuQuota": "100000", "cpuPeriod": "100000",
                                         "cpuShares": "512"}

    d.stop()
    d.start()  # the recorded resources are the base of the next update
    update(d, sid, overhead=Res(memory_limit_in_bytes=32 * MiB, cpu_quota=20_000,
                                cpu_period=100_000, cpu_shares=128))
    assert limits(cgroup) == expected(160 * MiB, 120_000, 640)

    update(d, sid, Res(memory_limit_in_bytes=48 * MiB, cpu_quota=30_000, cpu_period=100_000,
                       cpu_shares=2))  # shrinking works too
    assert limits(cgroup) == expected(80 * MiB, 50_000, 130)

    assert code_of(d, sid, Res(cpu_shares=-5)) == grpc.StatusCode.INVALID_ARGUMENT
    assert limits(cgroup) == expected(80 * MiB, 50_000, 130)
    stop(d, sid)
    assert code_of(d, sid, Res(cpu_shares=1024)) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(d, "0" * 64, Res(cpu_shares=1024)) == grpc.StatusCode.NOT_FOUND
    remove(d, sid)
    assert code_of(d, sid, Res(cpu_shares=1024)) == grpc.StatusCode.NOT_FOUND
    assert not any((h / cgroup.strip("/")).exists() for h in cgroups.detect().hierarchies())
