"""Stats, list filters, live resource updates and the hooks other layers use,
through the ContainerManager on real runc + conmon and real cgroups."""

from __future__ import annotations

import asyncio

import pytest

from api import api_pb2
from cri.errors import FailedPrecondition, NotFound
from runtimeservice.container import ContainerState
from tests.integration.containerenv import (
    ContainerEnv,
    await_until,
    busybox_rootfs,
    cenv,
    run,
)

pytestmark = pytest.mark.integration
__all__ = ["busybox_rootfs", "cenv"]

BUSY = ["sh", "-c", "head -c 3000000 /dev/zero > /tmp/blob; while true; do :; done"]


def _ids(items: list[api_pb2.Container] | list[api_pb2.ContainerStats]) -> set[str]:
    return {getattr(i, "id", "") or i.attributes.id for i in items}  # type: ignore[union-attr]


def test_list_filters(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            p1, p2 = await cenv.sandbox(), await cenv.sandbox()
            a = await mgr.create(cenv.request(p1, cenv.config("a", ["sleep", "100"],
                                                               labels={"app": "x", "n": "1"})))
            b = await mgr.create(cenv.request(p1, cenv.config("b", ["sleep", "100"],
                                                               labels={"app": "x", "n": "2"})))
            c = await mgr.create(cenv.request(p2, cenv.config("c", ["sleep", "100"],
                                                               labels={"app": "y"})))
            await mgr.start_container(b)
            F = api_pb2.ContainerFilter
            running = api_pb2.ContainerStateValue(state=api_pb2.ContainerState.CONTAINER_RUNNING)
            assert _ids(mgr.list()) == {a, b, c}
            assert _ids(mgr.list(F(id=a[:10]))) == {a}
            assert _ids(mgr.list(F(state=running))) == {b}
            assert _ids(mgr.list(F(pod_sandbox_id=p1.id))) == {a, b}
            assert _ids(mgr.list(F(pod_sandbox_id=p1.id[:8]))) == {a, b}
            assert _ids(mgr.list(F(label_selector={"app": "x"}))) == {a, b}
            assert _ids(mgr.list(F(label_selector={"app": "x", "n": "2"}, state=running,
                                   pod_sandbox_id=p1.id))) == {b}
            assert _ids(mgr.list(F(id="nomatch"))) == set()
            assert sum(len(x) for x in mgr.batches()) == 3
            for cid in (a, b, c):
                await mgr.remove(cid)

    run(scenario())


def test_container_and_pod_stats(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox(tier="t1")
            busy = await mgr.create(cenv.request(pod, cenv.config("busy", BUSY,
                                                                  labels={"k": "busy"})))
            idle = await mgr.create(cenv.request(pod, cenv.config("idle", ["sleep", "100"])))
            await mgr.start_container(busy)
            blob = mgr.store.get(busy).paths.upper / "tmp" / "blob"
            await await_until(lambda: blob.exists() and blob.stat().st_size >= 3_000_000,
                              "the file in the writable layer")
            first = await mgr.container_stats(busy)
            assert first.attributes.id == busy and first.attributes.metadata.name == "busy"
            assert dict(first.attributes.labels) == {"k": "busy"}
            assert first.cpu.usage_core_nano_seconds.value > 0
            assert first.memory.working_set_bytes.value > 0
            assert first.writable_layer.used_bytes.value >= 3_000_000
            assert first.writable_layer.inodes_used.value >= 2
            await asyncio.sleep(0.3)
            second = await mgr.container_stats(busy)
            assert second.cpu.usage_nano_cores.value > 0  # two samples: a rate
            stats = await mgr.list_container_stats()
            assert _ids(stats) == {busy, idle}  # the created one is included
            F = api_pb2.ContainerStatsFilter
            assert _ids(await mgr.list_container_stats(F(id=idle[:12]))) == {idle}
            assert _ids(await mgr.list_container_stats(F(label_selector={"k": "busy"}))) == {busy}
            assert _ids(await mgr.list_container_stats(F(pod_sandbox_id="0" * 64))) == set()
            assert _ids(await mgr.list_container_stats(F(pod_sandbox_id=pod.id))) == {busy, idle}
            ps = await mgr.pod_stats(pod.id)
            assert ps.attributes.id == pod.id and dict(ps.attributes.labels) == {"tier": "t1"}
            assert ps.linux.cpu.usage_core_nano_seconds.value >= \
                first.cpu.usage_core_nano_seconds.value
            assert ps.linux.memory.working_set_bytes.value > 0
            assert ps.linux.process.process_count.value >= 2  # busy's sh and idle's init
            assert {c.attributes.id for c in ps.linux.containers} == {busy, idle}
            assert not ps.linux.HasField("network")  # host network: no pod netns
            listed = await mgr.list_pod_stats(api_pb2.PodSandboxStatsFilter(
                label_selector={"tier": "t1"}))
            assert [p.attributes.id for p in listed] == [pod.id]
            assert await mgr.list_pod_stats(api_pb2.PodSandboxStatsFilter(id="zz")) == []
            with pytest.raises(NotFound):
                await mgr.container_stats("0" * 64)
            fs = await mgr.container_filesystems()
            assert fs[0].used_bytes.value >= 3_000_000
            for cid in (busy, idle):
                await mgr.remove(cid)

    run(scenario())


def test_update_resources_live(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            config = cenv.config("c", ["sleep", "1000"])
            config.linux.resources.memory_limit_in_bytes = 64 << 20
            config.linux.resources.cpu_shares = 512
            cid = await mgr.create(cenv.request(pod, config))
            await mgr.start_container(cid)
            cgroup = mgr.store.get(cid).cgroup
            limit = cenv.memory_file(cgroup, "memory.limit_in_bytes")
            assert int(limit.read_text()) == 64 << 20
            await mgr.update_resources(cid, api_pb2.LinuxContainerResources(
                memory_limit_in_bytes=96 << 20, cpu_quota=50000, cpu_period=100000))
            assert int(limit.read_text()) == 96 << 20
            cpu = cenv.cgroups.layout.controller_dir("cpu")
            assert cpu is not None
            assert (cpu / cgroup.strip("/") / "cpu.cfs_quota_us").read_text().strip() == "50000"
            res = (await mgr.status(cid)).status.resources.linux
            assert (res.memory_limit_in_bytes, res.cpu_shares, res.cpu_quota) == (
                96 << 20, 512, 50000)
            await mgr.stop(cid, 0)
            with pytest.raises(FailedPrecondition, match="cannot be updated"):
                await mgr.update_resources(cid, api_pb2.LinuxContainerResources(cpu_shares=2))
            await mgr.remove(cid)

    run(scenario())


def test_sandbox_hooks_and_image_in_use(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod, other = await cenv.sandbox(), await cenv.sandbox()
            ids = [await mgr.create(cenv.request(pod, cenv.config(n, ["sleep", "100"])))
                   for n in ("a", "b")]
            keep = await mgr.create(cenv.request(other, cenv.config("k", ["sleep", "100"])))
            for cid in (*ids, keep):
                await mgr.start_container(cid)
            assert mgr.image_in_use(cenv.image.id) and not mgr.image_in_use("sha256:" + "0" * 64)
            await mgr.stop_all(pod.id, 0)
            assert all(mgr.store.get(c).state is ContainerState.EXITED for c in ids)
            with pytest.raises(FailedPrecondition, match="stopping"):  # no new ones now
                await mgr.create(cenv.request(pod, cenv.config("late", ["true"])))
            assert mgr.store.get(keep).state is ContainerState.RUNNING
            await mgr.remove_all(pod.id)
            assert [c.id for c in mgr.list()] == [keep]
            await mgr.remove(keep)
            assert not mgr.image_in_use(cenv.image.id)

    run(scenario())
