"""Container logic without containers: log paths, exit reasons, records on disk,
CRI messages and filters, resource updates, CPU rates, sandbox contexts."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import InvalidArgument
from runtimeservice.cgroups import CgroupStats
from runtimeservice.container import (
    ContainerRecord,
    ContainerState,
    exit_reason,
    reservation_name,
)
from runtimeservice.container_create import cri_log_path, sandbox_context
from runtimeservice.container_exits import MonitorWatch
from runtimeservice.container_stats import MIN_WINDOW, StatsCollector
from runtimeservice.container_status import (
    ContainerCache,
    matches,
    stats_matches,
    to_status,
    verbose_info,
)
from runtimeservice.container_update import merged, oci_resources
from runtimeservice.ocispec import Ns
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.store import RecordStore


@pytest.mark.parametrize(("directory", "path", "expected"), [
    ("/var/log/pods/p", "c/0.log", "/var/log/pods/p/c/0.log"),
    ("/var/log/pods/p/", "./c/../c/1.log", "/var/log/pods/p/c/1.log"),
    ("/logs", "", ""),
])
def test_cri_log_path(directory: str, path: str, expected: str) -> None:
    assert cri_log_path(directory, path) == expected


@pytest.mark.parametrize(("directory", "path", "words"), [
    ("/logs", "../x.log", "escapes"),
    ("/logs", "a/../../x.log", "escapes"),
    ("/logs", "..", "escapes"),
    ("/logs", "/etc/x.log", "relative"),
    ("", "c.log", "no log_directory"),
    ("/logs", "a:b.log", "not allowed"),
])
def test_cri_log_path_refuses(directory: str, path: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        cri_log_path(directory, path)


def test_exit_reasons_and_names() -> None:
    assert exit_reason(0, False) == "Completed"
    assert exit_reason(2, False) == "Error"
    assert exit_reason(137, True) == "OOMKilled"
    assert exit_reason(0, True) == "Completed"  # an OOM kill of a child that did not matter
    config = api_pb2.ContainerConfig(metadata=api_pb2.ContainerMetadata(name="web", attempt=2))
    pod = api_pb2.PodSandboxMetadata(name="p", namespace="ns", uid="u1")
    assert reservation_name(config, pod) == "web_p_ns_u1_2"


def _record(**kw: object) -> ContainerRecord:
    config = api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="web", attempt=1),
        image=api_pb2.ImageSpec(image="docker.io/library/busybox:latest"))
    values: dict[str, object] = dict(
        id="ab" * 32, sandbox_id="cd" * 32, name="web_p_ns_u_1",
        config=config.SerializeToString(), fingerprint="f", runtime_handler="runc",
        created_at=1, state=ContainerState.RUNNING, dir="/b", persist_dir="/p",
        log_path="/logs/web.log", monitor_log="/logs/web.log", cgroup="/crib/pod/c",
        image_id="sha256:" + "1" * 64, image_ref="busybox@sha256:" + "2" * 64,
        stop_signal=10, stop_signal_name="SIGUSR1", uid=1000, gid=1000, groups=(1000, 2000),
        mounts=({"container_path": "/data", "host_path": "/srv", "readonly": True,
                 "propagation": 1, "recursive_read_only": False},),
        resources=api_pb2.LinuxContainerResources(cpu_shares=512).SerializeToString(),
        pid=42, conmon_pid=41, started_at=2, labels={"app": "x"}, annotations={"a": "1"})
    values.update(kw)
    return ContainerRecord(**values)  # type: ignore[arg-type]


def test_record_survives_the_store(tmp_path: Path) -> None:
    store: RecordStore[ContainerRecord] = RecordStore(tmp_path, ContainerRecord, "container")
    store.load()
    rec = store.put(_record())
    again: RecordStore[ContainerRecord] = RecordStore(tmp_path, ContainerRecord, "container")
    (loaded,) = again.load()
    assert loaded == rec and loaded.state is ContainerState.RUNNING
    assert loaded.groups == (1000, 2000) and loaded.mounts[0]["host_path"] == "/srv"
    assert loaded.container_config().metadata.name == "web"
    assert loaded.paths.merged == Path("/b/rootfs") and loaded.visible and loaded.live


def test_status_and_container_messages() -> None:
    rec = _record(state=ContainerState.EXITED, exit_code=3, reason="Error", finished_at=3)
    st = to_status(rec)
    assert st.state == api_pb2.ContainerState.CONTAINER_EXITED and st.exit_code == 3
    assert st.image.image == st.image.user_specified_image == "docker.io/library/busybox:latest"
    assert st.stop_signal == api_pb2.Signal.SIGUSR1
    assert list(st.user.linux.supplemental_groups) == [1000, 2000]
    assert st.mounts[0].readonly and st.mounts[0].propagation == 1
    assert st.resources.linux.cpu_shares == 512 and st.log_path == "/logs/web.log"
    cache = ContainerCache()
    first = cache.container(rec)
    assert cache.container(rec) is first  # same version: built once
    newer = dataclasses.replace(rec, state=ContainerState.RUNNING)
    assert cache.container(newer).state == api_pb2.ContainerState.CONTAINER_RUNNING
    info = verbose_info(rec, {"ociVersion": "1"})["info"]
    assert '"pid": 42' in info and '"runtimeSpec"' in info


def test_filters() -> None:
    rec = _record()
    F = api_pb2.ContainerFilter
    running = api_pb2.ContainerStateValue(state=api_pb2.ContainerState.CONTAINER_RUNNING)
    exited = api_pb2.ContainerStateValue(state=api_pb2.ContainerState.CONTAINER_EXITED)
    assert matches(rec, None) and matches(rec, F(id="abab", state=running))
    assert not matches(rec, F(state=exited)) and not matches(rec, F(id="ff"))
    assert matches(rec, F(pod_sandbox_id="cdcd", label_selector={"app": "x"}))
    assert not matches(rec, F(label_selector={"app": "y"}))
    assert not matches(_record(state=ContainerState.CREATING), None)
    S = api_pb2.ContainerStatsFilter
    assert stats_matches(_record(state=ContainerState.CREATED), S(id="ab"))
    assert not stats_matches(rec, S(pod_sandbox_id="00"))


def test_oci_resources_and_merge() -> None:
    res = api_pb2.LinuxContainerResources(cpu_quota=-1, cpu_period=100000,
                                          memory_limit_in_bytes=1 << 26, cpuset_cpus="0")
    assert oci_resources(res, cgroup_v2=False) == {
        "cpu": {"quota": -1, "period": 100000, "cpus": "0"}, "memory": {"limit": 1 << 26}}
    with pytest.raises(InvalidArgument, match="cgroup v2"):
        oci_resources(api_pb2.LinuxContainerResources(unified={"memory.high": "1"}),
                      cgroup_v2=False)
    with pytest.raises(InvalidArgument, match="below"):
        oci_resources(api_pb2.LinuxContainerResources(
            memory_limit_in_bytes=100, memory_swap_limit_in_bytes=50), cgroup_v2=True)
    assert oci_resources(api_pb2.LinuxContainerResources(memory_swap_limit_in_bytes=-1),
                         cgroup_v2=False, swap_supported=False) == {}
    old = api_pb2.LinuxContainerResources(cpu_shares=2, memory_limit_in_bytes=10)
    new = merged(old, api_pb2.LinuxContainerResources(memory_limit_in_bytes=20))
    assert (new.cpu_shares, new.memory_limit_in_bytes) == (2, 20)


def test_cpu_rate_needs_two_samples_far_enough_apart() -> None:
    stats = StatsCollector(cgroups=None, layer_fs="/x")  # type: ignore[arg-type]
    assert stats._rate("c", 0, 1000) is None
    assert stats._rate("c", MIN_WINDOW // 2, 2000) is None  # too close: no rate yet
    assert stats._rate("c", 1_000_000_000, 500_001_000) == 500_000_000  # half a core
    assert stats._rate("c", 1_000_000_001, 900_000_000) == 500_000_000  # reused
    assert stats._rate("c", 2_000_000_000, 100) is None  # counter reset: start over
    assert stats._rate("c", 0, None) is None
    msg = StatsCollector._memory(5, CgroupStats(memory_working_set=10, memory_limit=100,
                                                memory_usage=20))
    assert msg.available_bytes.value == 90 and msg.usage_bytes.value == 20


def test_sandbox_context_maps_namespaces_and_files(tmp_path: Path) -> None:
    pod = api_pb2.PodSandboxConfig(log_directory="/logs")
    pod.linux.security_context.namespace_options.pid = api_pb2.NamespaceMode.NODE
    (tmp_path / "hosts").write_text("")
    rec = SandboxRecord(
        id="s" * 64, config=pod.SerializeToString(), runtime_handler="", created_at=0,
        state=SandboxState.READY, fingerprint="", ns_dir="", pod_dir=str(tmp_path),
        run_dir="", shm="/run/shm", cgroup="/crib/pod", cgroup_runc="/crib/pod",
        netns="/run/ns/net", ipcns="", utsns="/run/ns/uts")
    ctx = sandbox_context(rec, "host1")
    assert ctx.net_ns == "/run/ns/net" and ctx.ipc_ns is Ns.HOST and ctx.uts_ns == "/run/ns/uts"
    assert ctx.pid_ns is Ns.HOST and ctx.shm_path == "/run/shm" and ctx.log_dir == "/logs"
    assert ctx.hosts_path == str(tmp_path / "hosts") and ctx.resolv_conf_path is None
    shared = sandbox_context(dataclasses.replace(rec, pidns="/proc/9/ns/pid"), "h")
    assert shared.pid_ns == "/proc/9/ns/pid"


def test_monitor_watch_fires_for_a_process_that_is_not_conmon_or_is_gone() -> None:
    fired: list[str] = []

    async def scenario() -> None:
        watch = MonitorWatch(fired.append)
        child = subprocess.Popen(["sleep", "30"])
        try:
            watch.watch("a", child.pid)  # alive, but not a conmon for "a"
            await asyncio.sleep(0)
            assert fired == ["a"] and len(watch) == 0
        finally:
            child.kill()
            child.wait()
        watch.watch("b", child.pid)  # gone
        await asyncio.sleep(0.01)
        assert fired == ["a", "b"]
        watch.close()

    asyncio.run(scenario())
