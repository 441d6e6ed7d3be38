"""Pure logic behind the operator RPCs: the event hub's start-up replay, failures
counted by step, and cgroup files read as cAdvisor metrics (on fake trees)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import api_pb2
from cri import metrics
from cri.errors import ResourceExhausted, Unavailable
from runtimeservice import failure_steps
from runtimeservice.cgroups import CgroupLayout, CgroupMode
from runtimeservice.container_metrics import CgroupReader, _link_counters, weight_to_shares
from runtimeservice.events_rpcs import EventHandlers, EventHub
from runtimeservice.failure_steps import FailureSteps


def event(i: int) -> api_pb2.ContainerEventResponse:
    return api_pb2.ContainerEventResponse(
        container_id=f"c{i}", container_event_type=api_pb2.CONTAINER_STOPPED_EVENT,
        created_at=i)


# ------------------------------------------------------------------ the event hub


def test_recovery_events_are_replayed_to_every_early_subscriber_then_live_ones() -> None:
    async def main() -> None:
        hub = EventHub(buffer=10, replay_window=60)
        assert hub.wanted  # recovering: events are kept even without subscribers
        hub.publish(event(1))
        hub.publish(event(2))
        hub.recovered()
        assert not hub.wanted
        for _ in range(2):
            replay, sub = hub.subscribe()
            assert [e.container_id for e in replay] == ["c1", "c2"]
            assert hub.wanted
            hub.publish(event(3))
            assert (await anext(sub)).container_id == "c3"
            sub.close()
        assert hub.bus.subscribers == 0

    asyncio.run(main())


def test_replay_ends_with_its_window_and_is_bounded() -> None:
    async def main() -> None:
        hub = EventHub(buffer=10, replay_window=0, replay_limit=3)
        for i in range(5):
            hub.publish(event(i))
        hub.recovered()
        await asyncio.sleep(0.01)
        replay, sub = hub.subscribe()
        assert replay == []
        sub.close()
        late = EventHub(buffer=10, replay_window=60, replay_limit=3)
        for i in range(5):
            late.publish(event(i))
        late.recovered()
        replay, sub = late.subscribe()
        assert [e.container_id for e in replay] == ["c2", "c3", "c4"]  # the newest kept
        sub.close()
        late.publish(event(9))  # live events are not kept for replay
        replay, sub = late.subscribe()
        assert [e.container_id for e in replay] == ["c2", "c3", "c4"]
        sub.close()

    asyncio.run(main())


class FakeContext:
    def __init__(self) -> None:
        self.headers_sent = False

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.headers_sent = True


def test_stream_sends_headers_replay_then_live_and_ends_when_dropped() -> None:
    async def main() -> None:
        servicer = EventHandlers()
        servicer.event_hub = hub = EventHub(buffer=2, replay_window=60)
        hub.publish(event(1))
        hub.recovered()
        ctx = FakeContext()
        stream = servicer.GetContainerEvents(api_pb2.GetEventsRequest(), ctx)  # type: ignore[arg-type]
        assert (await anext(stream)).container_id == "c1"
        assert ctx.headers_sent
        for i in (2, 3, 4):  # the third overflows a buffer of 2: dropped
            hub.publish(event(i))
        with pytest.raises(ResourceExhausted, match="too slow"):
            await anext(stream)
        assert hub.bus.subscribers == 0

    asyncio.run(main())


def test_closing_the_hub_ends_streams_with_unavailable_after_their_events() -> None:
    async def main() -> None:
        servicer = EventHandlers()
        servicer.event_hub = hub = EventHub(buffer=10)
        hub.recovered()
        stream = servicer.GetContainerEvents(api_pb2.GetEventsRequest(), FakeContext())  # type: ignore[arg-type]
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the stream subscribes on its first step
        hub.publish(event(1))
        assert (await first).container_id == "c1"
        hub.publish(event(2))
        hub.close()
        assert (await anext(stream)).container_id == "c2"
        with pytest.raises(Unavailable, match="shutting down"):
            await anext(stream)

    asyncio.run(main())


# ------------------------------------------------------------------ failures by step


@pytest.fixture
def prom() -> Iterator[None]:
    metrics.disable()
    metrics.enable()
    yield
    metrics.disable()


def failures() -> dict[tuple[str, str], float]:
    reg = metrics.registry()
    assert reg is not None
    out = {}
    for family in reg.collect():
        if family.name == "crib_operation_failures":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["operation"], s.labels["step"])] = s.value
    return out


def test_a_failure_is_counted_once_at_the_step_that_failed(prom: None) -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            async with FailureSteps("CreateContainer") as failing:
                failing.at(failure_steps.MOUNT)
                raise OSError("mount failed")
        assert failing.failed_step == "mount"

        async def broken() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("cni said no")

        async def fine() -> int:
            return 1

        failing = FailureSteps("RunPodSandbox")
        with pytest.raises(RuntimeError), failing:
            failing.at(failure_steps.RECORD)
            await asyncio.gather(failing.run(failure_steps.CNI, broken()),
                                 failing.run(failure_steps.OCI_RUNTIME, fine()))
        assert failing.failed_step == "cni"  # not "record", and not counted twice

        with pytest.raises(asyncio.CancelledError):
            async with FailureSteps("CreateContainer") as cancelled:
                cancelled.at(failure_steps.OCI_RUNTIME)
                raise asyncio.CancelledError
        assert cancelled.failed_step is None

    asyncio.run(main())
    assert failures() == {("CreateContainer", "mount"): 1.0, ("RunPodSandbox", "cni"): 1.0}


def test_failures_cost_nothing_with_metrics_off() -> None:
    metrics.disable()
    failing = FailureSteps("RunPodSandbox", failure_steps.CGROUP)
    failing.fail()
    assert failing.failed_step == "cgroup" and metrics.registry() is None


# ------------------------------------------------------------------ cgroup files


def write(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_v1_files_become_a_cadvisor_snapshot(tmp_path: Path) -> None:
    ctrl = {c: tmp_path / c for c in ("cpu", "cpuacct", "memory", "pids", "hugetlb")}
    layout = CgroupLayout(CgroupMode.HYBRID, tmp_path, v1=ctrl)
    cg = "pod/ctr"
    write(ctrl["cpuacct"] / cg, {"cpuacct.usage": "3000000000\n", "cpuacct.usage_user": "2000\n",
                                 "cpuacct.usage_sys": "1000\n"})
    write(ctrl["cpu"] / cg, {"cpu.stat": "nr_periods 10\nnr_throttled 2\nthrottled_time 500\n",
                             "cpu.shares": "512\n", "cpu.cfs_period_us": "100000\n",
                             "cpu.cfs_quota_us": "-1\n"})
    write(ctrl["memory"] / cg, {
        "memory.usage_in_bytes": "10000\n", "memory.max_usage_in_bytes": "20000\n",
        "memory.failcnt": "3\n", "memory.kmem.usage_in_bytes": "700\n",
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.soft_limit_in_bytes": "9223372036854771712\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n",
        "memory.stat": "pgfault 5\npgmajfault 1\ntotal_cache 300\ntotal_rss 400\n"
                       "total_mapped_file 50\ntotal_swap 0\ntotal_inactive_file 1000\n"
                       "total_pgfault 9\ntotal_pgmajfault 2\n"})
    write(ctrl["pids"] / cg, {"cgroup.procs": "", "tasks": "", "pids.max": "max\n",
                              "child/cgroup.procs": "", "child/tasks": ""})
    write(ctrl["hugetlb"] / cg, {"hugetlb.2MB.usage_in_bytes": "4194304\n",
                                 "hugetlb.2MB.max_usage_in_bytes": "6291456\n"})
    snap = CgroupReader(layout).snapshot(cg, start_time_ns=5_500_000_000)
    assert snap.cpu is not None and snap.cpu.usage_ns == 3_000_000_000
    assert (snap.cpu.cfs_periods, snap.cpu.cfs_throttled_periods,
            snap.cpu.cfs_throttled_ns) == (10, 2, 500)
    mem = snap.memory
    assert mem is not None
    assert (mem.usage, mem.max_usage, mem.working_set, mem.failcnt) == (10000, 20000, 9000, 3)
    assert (mem.cache, mem.rss, mem.mapped_file, mem.kernel) == (300, 400, 50, 700)
    assert (mem.pgfault, mem.hierarchical_pgfault, mem.hierarchical_pgmajfault) == (5, 9, 2)
    assert snap.oom_events == 4 and snap.start_time_s == 5
    assert snap.processes is not None
    assert (snap.processes.processes, snap.processes.threads_max) == (0, 0)
    assert snap.spec is not None and (snap.spec.cpu_shares, snap.spec.cpu_quota) == (512, -1)
    assert [(h.pagesize, h.usage, h.max_usage) for h in snap.hugetlb] == [
        ("2MB", 4194304, 6291456)]


def test_v2_files_become_a_cadvisor_snapshot(tmp_path: Path) -> None:
    layout = CgroupLayout(CgroupMode.UNIFIED, tmp_path, unified=tmp_path,
                          v2_controllers=frozenset({"cpu", "memory", "pids"}))
    cg = "pod/ctr"
    write(tmp_path / cg, {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\n"
                    "nr_throttled 1\nthrottled_usec 7\n",
        "cpu.weight": "100\n", "cpu.max": "50000 100000\n",
        "memory.current": "8192\n", "memory.max": "max\n", "memory.swap.current": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\n",
        "memory.stat": "anon 4096\nfile 2048\nfile_mapped 1024\nkernel_stack 100\nslab 28\n"
                       "inactive_file 2048\npgfault 11\npgmajfault 0\n",
        "cgroup.procs": "", "cgroup.threads": "", "pids.max": "64\n"})
    snap = CgroupReader(layout).snapshot(cg)
    assert snap.cpu is not None
    assert (snap.cpu.usage_ns, snap.cpu.user_ns, snap.cpu.cfs_throttled_ns) == (
        1_500_000, 1_000_000, 7000)
    mem = snap.memory
    assert mem is not None
    assert (mem.usage, mem.working_set, mem.rss, mem.cache, mem.kernel, mem.failcnt) == (
        8192, 6144, 4096, 2048, 128, 6)
    assert snap.oom_events == 1
    assert snap.spec is not None
    assert (snap.spec.memory_limit_bytes, snap.spec.cpu_shares, snap.spec.cpu_quota,
            snap.spec.cpu_period) == (None, weight_to_shares(100), 50000, 100000)
    assert snap.processes is not None and snap.processes.threads_max == 64
    assert weight_to_shares(1) == 2 and weight_to_shares(10000) == 262144


def test_missing_files_leave_metrics_out(tmp_path: Path) -> None:
    layout = CgroupLayout(CgroupMode.LEGACY, tmp_path, v1={"memory": tmp_path / "memory"})
    snap = CgroupReader(layout).snapshot("gone")
    assert snap.memory is None and snap.processes is None and snap.hugetlb == ()
    assert snap.cpu is not None and snap.cpu.usage_ns is None


class FakeIPRoute:
    def get_links(self) -> list[dict[str, Any]]:
        stats = {"rx_bytes": 10, "rx_packets": 2, "rx_errors": 0, "rx_dropped": 1,
                 "tx_bytes": 20, "tx_packets": 3, "tx_errors": 4, "tx_dropped": 0}
        return [{"IFLA_IFNAME": "lo", "IFLA_STATS64": stats},
                {"IFLA_IFNAME": "eth0", "IFLA_STATS64": stats}]


def test_link_counters_skip_loopback() -> None:
    [eth0] = _link_counters(FakeIPRoute())
    assert (eth0.name, eth0.rx_bytes, eth0.rx_dropped, eth0.tx_errors) == ("eth0", 10, 1, 4)
