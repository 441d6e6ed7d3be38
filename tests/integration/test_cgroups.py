"""Pod cgroups on this host's real hierarchies: limits, processes, stats, removal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.errors import FailedPrecondition
from runtimeservice import cgroups
from runtimeservice.cgroups import CgroupDriver, CgroupManager, CgroupResources

pytestmark = pytest.mark.integration


@pytest.fixture
def parent() -> Iterator[str]:
    """A unique top-level parent; checked gone from every hierarchy afterwards."""
    name = f"cribtest{uuid.uuid4().hex[:8]}"
    yield name
    layout = cgroups.detect()
    mgr = CgroupManager(layout)
    for top in (f"/{name}", f"/{name}.slice"):
        asyncio.run(mgr.remove(top))
    for h in layout.hierarchies():
        assert not any(p.name.startswith(name) for p in h.iterdir()), h


def spawn_in(layout: cgroups.CgroupLayout, path: str, *argv: str) -> subprocess.Popen[bytes]:
    """Start argv with its shell already inside `path` in every hierarchy."""
    procs = " ".join(str(h / path.strip("/") / "cgroup.procs") for h in layout.hierarchies())
    script = f'for f in {procs}; do echo $$ > "$f" || exit 97; done; exec "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *argv])


def read(d: Path, name: str) -> str:
    return (d / name).read_text().strip()


def test_limits_processes_stats_and_removal(parent: str) -> None:
    layout = cgroups.detect()
    mgr = CgroupManager(layout)
    pod = mgr.pod_path(f"/{parent}/pod1", "a1b2")
    res = CgroupResources(cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                          memory_limit=128 << 20, pids_limit=50)
    asyncio.run(mgr.create(pod.path, res))
    rel = pod.path.strip("/")
    for h in layout.hierarchies():
        assert (h / rel).is_dir(), h
    if layout.is_v2:
        d = layout.root / rel
        assert read(d, "cpu.weight") == str(cgroups.shares_to_weight(512))
        assert read(d, "cpu.max") == "50000 100000"
        assert read(d, "memory.max") == str(128 << 20)
        assert read(d, "pids.max") == "50"
    else:
        assert read(layout.v1["cpu"] / rel, "cpu.shares") == "512"
        assert read(layout.v1["cpu"] / rel, "cpu.cfs_quota_us") == "50000"
        assert read(layout.v1["cpu"] / rel, "cpu.cfs_period_us") == "100000"
        assert read(layout.v1["memory"] / rel, "memory.limit_in_bytes") == str(128 << 20)
        assert read(layout.v1["pids"] / rel, "pids.max") == "50"
        assert read(layout.v1["cpuset"] / rel, "cpuset.cpus") == \
            read(layout.v1["cpuset"], "cpuset.cpus")

    asyncio.run(mgr.update(pod.path, CgroupResources(memory_limit=64 << 20)))
    name = "memory.max" if layout.is_v2 else "memory.limit_in_bytes"
    mem_dir = layout.controller_dir("memory")
    assert mem_dir is not None and read(mem_dir / rel, name) == str(64 << 20)

    child = cgroups.container_cgroup_path(pod, "c1", CgroupDriver.CGROUPFS)
    asyncio.run(mgr.create(child.path))
    proc = spawn_in(layout, child.path, "sleep", "60")
    try:
        for _ in range(200):
            if asyncio.run(mgr.pids(pod.path)) == [proc.pid]:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert asyncio.run(mgr.pids(pod.path)) == [proc.pid]
        assert asyncio.run(mgr.pids(pod.path, recursive=False)) == []
        stats = asyncio.run(mgr.stats(child.path))
        assert stats.pids_current == 1
        assert stats.cpu_usage_ns is not None and stats.memory_usage is not None
        with pytest.raises(FailedPrecondition, match=str(proc.pid)):
            asyncio.run(mgr.remove(pod.path))
        assert mgr.exists(child.path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    asyncio.run(mgr.remove(pod.path))
    for h in layout.hierarchies():
        assert not (h / rel).exists(), h
    asyncio.run(mgr.remove(pod.path))  # idempotent


def test_oom_kill_is_counted(parent: str) -> None:
    layout = cgroups.detect()
    mgr = CgroupManager(layout)
    pod = mgr.pod_path(f"/{parent}", "oom")
    limit = 32 << 20
    asyncio.run(mgr.create(pod.path, CgroupResources(memory_limit=limit,
                                                     memory_swap_limit=limit)))
    assert asyncio.run(mgr.oom_kill_count(pod.path)) == 0
    proc = spawn_in(layout, pod.path, sys.executable, "-c", "b = bytearray(256 << 20)")
    assert proc.wait() == -signal.SIGKILL
    assert asyncio.run(mgr.oom_kill_count(pod.path)) >= 1
    asyncio.run(mgr.remove(pod.path))


def test_systemd_naming_on_the_filesystem(parent: str) -> None:
    layout = cgroups.detect()
    mgr = CgroupManager(layout, CgroupDriver.SYSTEMD)
    pod = mgr.pod_path(f"{parent}-pod_x.slice", "s1")
    assert pod.path == (f"/{parent}.slice/{parent}-pod_x.slice/"
                        f"{parent}-pod_x-crib_s1.slice")
    asyncio.run(mgr.create(pod.path, CgroupResources(pids_limit=10)))
    assert all((h / pod.path.strip("/")).is_dir() for h in layout.hierarchies())
    asyncio.run(mgr.remove(pod.path))
    assert not mgr.exists(pod.path) and mgr.exists(f"/{parent}.slice")


def test_this_host_layout_is_detected() -> None:
    layout = cgroups.detect()
    with open("/proc/self/mountinfo") as fh:
        root_fs = [line.split(" - ")[1].split()[0] for line in fh
                   if line.split()[4] == "/sys/fs/cgroup"]
    if root_fs == ["cgroup2"]:
        assert layout.is_v2
    else:
        assert layout.mode in (cgroups.CgroupMode.HYBRID, cgroups.CgroupMode.LEGACY)
        assert {"cpu", "memory", "pids"} <= set(layout.v1)
    assert os.path.isdir(layout.hierarchies()[0])
