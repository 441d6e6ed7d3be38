"""UpdatePodSandboxResources: which limits the pod cgroup gets and what the record keeps."""

from __future__ import annotations

import pytest

from api import api_pb2
from cri.errors import InvalidArgument
from runtimeservice.cgroups import CgroupResources
from runtimeservice.sandbox import SandboxRecord
from runtimeservice.sandbox_status import verbose_info
from runtimeservice.sandbox_update import cgroup_limits, record_changes, updated_resources
from tests.unit.test_sandbox_status import record

Res = api_pb2.LinuxContainerResources


def created_with(resources: Res | None = None, overhead: Res | None = None) -> SandboxRecord:
    config = api_pb2.PodSandboxConfig.FromString(record().config)
    if resources is not None:
        config.linux.resources.CopyFrom(resources)
    if overhead is not None:
        config.linux.overhead.CopyFrom(overhead)
    return record(config=config.SerializeToString())


def request(resources: Res | None = None, overhead: Res | None = None
            ) -> api_pb2.UpdatePodSandboxResourcesRequest:
    req = api_pb2.UpdatePodSandboxResourcesRequest(pod_sandbox_id="ab" * 32)
    if resources is not None:
        req.resources.CopyFrom(resources)
    if overhead is not None:
        req.overhead.CopyFrom(overhead)
    return req


def test_new_resources_plus_the_overhead_from_creation() -> None:
    rec = created_with(Res(memory_limit_in_bytes=64 << 20, cpu_shares=256),
                       Res(memory_limit_in_bytes=16 << 20, cpu_shares=64, cpu_quota=10_000,
                           cpu_period=100_000))
    req = request(Res(memory_limit_in_bytes=128 << 20, cpu_shares=512, cpu_quota=50_000,
                      cpu_period=100_000))
    assert cgroup_limits(rec, req, cgroup_v2=False) == CgroupResources(
        cpu_shares=576, cpu_quota=60_000, cpu_period=100_000, memory_limit=144 << 20)
    assert list(record_changes(req)) == ["resources"]


def test_overhead_alone_never_caps_an_unlimited_pod() -> None:
    rec = created_with(None, None)
    req = request(Res(cpu_shares=2), Res(memory_limit_in_bytes=16 << 20, cpu_quota=10_000))
    assert cgroup_limits(rec, req, cgroup_v2=False) == CgroupResources(cpu_shares=2)
    assert sorted(record_changes(req)) == ["overhead", "resources"]


def test_the_recorded_update_is_the_base_of_the_next_one() -> None:
    rec = created_with(Res(memory_limit_in_bytes=64 << 20), Res(memory_limit_in_bytes=1 << 20))
    first = request(overhead=Res(memory_limit_in_bytes=2 << 20))
    rec = SandboxRecord(**{**rec.__dict__, **record_changes(first)})
    res, over = updated_resources(rec, request(Res(memory_limit_in_bytes=32 << 20)))
    assert res is not None and res.memory_limit_in_bytes == 32 << 20
    assert over is not None and over.memory_limit_in_bytes == 2 << 20
    assert rec.pod_resources()[0] == Res(memory_limit_in_bytes=64 << 20)  # from the config
    info = verbose_info(rec)
    assert info["overhead"] == {"memoryLimitInBytes": str(2 << 20)}
    assert info["resources"] == {"memoryLimitInBytes": str(64 << 20)}


def test_nothing_given_changes_nothing() -> None:
    req = request()
    assert record_changes(req) == {}
    assert cgroup_limits(created_with(), req, cgroup_v2=False) is None


@pytest.mark.parametrize("bad, words", [
    (Res(cpu_shares=-1), "cpu_shares -1"),
    (Res(memory_limit_in_bytes=-7), "memory_limit -7"),
    (Res(unified={"memory.high": "1M"}), "cgroup v1"),
    (Res(hugepage_limits=[api_pb2.HugepageLimit(page_size="2Mi", limit=1)]), "2Mi"),
])
def test_invalid_values_are_named(bad: Res, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        cgroup_limits(created_with(), request(bad), cgroup_v2=False)
