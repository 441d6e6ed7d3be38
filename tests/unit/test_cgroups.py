"""cgroups: layout detection, naming, limits, stats and removal on fake v1/v2 trees.

The fake tree is a tmp directory with the files the kernel would show; `_mkdir`
and `_rmdir` are replaced by a "kernel" that populates a new cgroup's control
files and deletes them again, as cgroupfs does.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cri.errors import FailedPrecondition, InvalidArgument
from runtimeservice import cgroups
from runtimeservice.cgroups import (
    CgroupDriver,
    CgroupManager,
    CgroupMode,
    CgroupResources,
    container_cgroup_path,
    expand_slice,
    pod_cgroup_path,
    shares_to_weight,
    swap_v2,
    validate_cgroup_parent,
)

V1_FILES: dict[str, dict[str, str]] = {
    "cpu": {"cpu.shares": "1024", "cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1"},
    "cpuacct": {"cpuacct.usage": "0", "cpuacct.usage_user": "0", "cpuacct.usage_sys": "0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": ""},
    "memory": {"memory.limit_in_bytes": "9223372036854771712",
               "memory.memsw.limit_in_bytes": "9223372036854771712",
               "memory.usage_in_bytes": "0", "memory.stat": "",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max", "pids.current": "0"},
    "systemd": {}, "devices": {}, "unified": {"cgroup.controllers": "",
                                              "cgroup.subtree_control": ""},
}
V2_FILES = {"cpu.weight": "100", "cpu.max": "max 100000", "cpu.stat": "usage_usec 0\n",
            "cpuset.cpus": "", "cpuset.mems": "", "memory.max": "max",
            "memory.swap.max": "max", "memory.high": "max", "memory.current": "0",
            "memory.stat": "",
            "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
            "pids.max": "max", "pids.current": "0", "hugetlb.2MB.max": "max",
            "cgroup.subtree_control": ""}


def _populate(d: Path, files: dict[str, str]) -> None:
    (d / "cgroup.procs").write_text("")
    for name, value in files.items():
        (d / name).write_text(value)


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, files_for: Callable[[Path], dict[str, str]]
                 ) -> None:
    def mkdir(path: Path) -> None:
        os.mkdir(path)
        _populate(path, files_for(path))

    def rmdir(path: Path) -> None:
        if (path / "cgroup.procs").read_text().strip():
            raise OSError(errno.EBUSY, "busy")
        for f in path.iterdir():
            if f.is_file():
                f.unlink()
        os.rmdir(path)

    monkeypatch.setattr(cgroups, "_mkdir", mkdir)
    monkeypatch.setattr(cgroups, "_rmdir", rmdir)


@pytest.fixture
def v1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CgroupManager:
    """A hybrid host like this one: cpu and cpuacct mounted separately, cgroup2 at unified."""
    root = tmp_path / "cgroup"
    lines = [f"30 1 0:25 / {root} rw - tmpfs tmpfs rw"]
    for i, name in enumerate(V1_FILES):
        d = root / name
        d.mkdir(parents=True)
        _populate(d, V1_FILES[name])
        if name == "unified":
            lines.append(f"{40 + i} 30 0:{40 + i} / {d} rw - cgroup2 cgroup2 rw")
        else:
            opt = "name=systemd" if name == "systemd" else name
            lines.append(f"{40 + i} 30 0:{40 + i} / {d} rw,relatime - cgroup cgroup rw,{opt}")
    (root / "cpuset" / "cpuset.cpus").write_text("0-3\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("\n".join(lines) + "\n")
    _fake_kernel(monkeypatch, lambda p: V1_FILES[p.relative_to(root).parts[0]])
    layout = cgroups.detect(root, mountinfo)
    return CgroupManager(layout)


@pytest.fixture
def v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CgroupManager:
    root = tmp_path / "cgroup"
    root.mkdir()
    _populate(root, {"cgroup.controllers": "cpuset cpu io memory hugetlb pids",
                     "cgroup.subtree_control": ""})
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"30 1 0:25 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")

    def files(path: Path) -> dict[str, str]:
        enabled = (path.parent / "cgroup.subtree_control").read_text().replace("+", "")
        return {**V2_FILES, "cgroup.controllers": enabled}

    _fake_kernel(monkeypatch, files)
    return CgroupManager(cgroups.detect(root, mountinfo), CgroupDriver.SYSTEMD)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# ---------------------------------------------------------------- detection and naming


def test_detect_hybrid_layout(v1: CgroupManager) -> None:
    lay = v1.layout
    assert lay.mode is CgroupMode.HYBRID and not lay.is_v2
    assert lay.v1["cpu"] != lay.v1["cpuacct"]  # mounted separately, as on this host
    assert lay.v1["name=systemd"].name == "systemd"
    assert lay.unified == lay.root / "unified"
    assert len(lay.hierarchies()) == len(V1_FILES)


def test_detect_unified_and_legacy(v2: CgroupManager, tmp_path: Path) -> None:
    assert v2.layout.mode is CgroupMode.UNIFIED
    assert "memory" in v2.layout.v2_controllers
    mi = tmp_path / "legacy"
    mi.write_text("40 30 0:40 / /x/cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
                  "41 30 0:41 / /x/cg/memory rw - cgroup cgroup rw,memory\n"
                  "42 30 0:42 / /elsewhere rw - cgroup cgroup rw,pids\n")
    lay = cgroups.detect(Path("/x/cg"), mi)
    assert lay.mode is CgroupMode.LEGACY and lay.unified is None
    assert lay.v1["cpu"] == lay.v1["cpuacct"] == Path("/x/cg/cpu,cpuacct")
    assert "pids" not in lay.v1
    assert len(lay.hierarchies()) == 2
    with pytest.raises(FailedPrecondition):
        cgroups.detect(Path("/nothing"), mi)


def test_expand_slice_like_systemd() -> None:
    assert expand_slice("-.slice") == "/"
    assert expand_slice("kubepods.slice") == "/kubepods.slice"
    assert expand_slice("kubepods-besteffort-pod12_3.slice") == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_3.slice")
    for bad in ("a--b.slice", "-a.slice", "a-.slice", "a/b.slice", "a.scope", ".slice"):
        with pytest.raises(InvalidArgument):
            expand_slice(bad)


def test_pod_and_container_paths() -> None:
    fs = pod_cgroup_path("/kubepods/besteffort/pod1", "ab12", CgroupDriver.CGROUPFS)
    assert fs.path == fs.runc == "/kubepods/besteffort/pod1/crib-ab12"
    c = container_cgroup_path(fs, "cd34", CgroupDriver.CGROUPFS)
    assert c.path == c.runc == "/kubepods/besteffort/pod1/crib-ab12/crib-cd34"
    sd = pod_cgroup_path("kubepods-besteffort-pod1.slice", "ab12", CgroupDriver.SYSTEMD)
    assert sd.runc == "kubepods-besteffort-pod1-crib_ab12.slice"
    assert sd.path == ("/kubepods.slice/kubepods-besteffort.slice/"
                       "kubepods-besteffort-pod1.slice/kubepods-besteffort-pod1-crib_ab12.slice")
    c = container_cgroup_path(sd, "cd34", CgroupDriver.SYSTEMD)
    assert c.path == sd.path + "/crib-cd34.scope"
    assert c.runc == "kubepods-besteffort-pod1-crib_ab12.slice:crib:cd34"
    assert pod_cgroup_path("", "x", CgroupDriver.CGROUPFS).path == "/crib/crib-x"
    assert pod_cgroup_path("", "x", CgroupDriver.SYSTEMD).path == "/crib.slice/crib-crib_x.slice"


@pytest.mark.parametrize(("parent", "driver"), [
    ("/kubepods/../etc", CgroupDriver.CGROUPFS),
    ("kubepods.slice", CgroupDriver.CGROUPFS),
    ("/kubepods/pod1", CgroupDriver.SYSTEMD),
    ("kubepods", CgroupDriver.SYSTEMD),
])
def test_invalid_parents_are_refused(parent: str, driver: CgroupDriver) -> None:
    with pytest.raises(InvalidArgument, match=r"parent|slice"):
        validate_cgroup_parent(parent, driver)
    with pytest.raises(InvalidArgument):
        pod_cgroup_path("/ok", "../x", CgroupDriver.CGROUPFS)


def test_v2_conversions_match_runc() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 39
    assert shares_to_weight(262144) == 10000
    assert swap_v2(0, 0) is None
    assert swap_v2(0, -1) == -1
    assert swap_v2(-1, 100) == -1
    assert swap_v2(300, 100) == 200
    with pytest.raises(InvalidArgument):
        swap_v2(50, 100)
    with pytest.raises(InvalidArgument):
        swap_v2(50, 0)


# ---------------------------------------------------------------- v1


def read(d: Path, name: str) -> str:
    return (d / name).read_text().strip()


def test_v1_create_writes_limits_everywhere(v1: CgroupManager) -> None:
    root = v1.layout.root
    res = CgroupResources(cpu_shares=512, cpu_quota=50000, cpu_period=100000,
                          memory_limit=256 << 20, memory_swap_limit=512 << 20, pids_limit=64,
                          hugepage_limits={"2MB": 0})  # hugetlb not mounted: ignored
    run(v1.create("/kubepods/pod1/crib-a", res))
    for h in V1_FILES:
        assert (root / h / "kubepods/pod1/crib-a").is_dir()
    d = "kubepods/pod1/crib-a"
    assert read(root / "cpu" / d, "cpu.shares") == "512"
    assert read(root / "cpu" / d, "cpu.cfs_quota_us") == "50000"
    assert read(root / "memory" / d, "memory.limit_in_bytes") == str(256 << 20)
    assert read(root / "memory" / d, "memory.memsw.limit_in_bytes") == str(512 << 20)
    assert read(root / "pids" / d, "pids.max") == "64"
    # Empty cpuset levels inherit the parent's cpus/mems, all the way down.
    for sub in ("kubepods", "kubepods/pod1", d):
        assert read(root / "cpuset" / sub, "cpuset.cpus") == "0-3"
        assert read(root / "cpuset" / sub, "cpuset.mems") == "0"


def test_v1_explicit_cpuset_and_update(v1: CgroupManager) -> None:
    root = v1.layout.root
    run(v1.create("/p", CgroupResources(cpuset_cpus="1", memory_limit=-1)))
    assert read(root / "cpuset/p", "cpuset.cpus") == "1"
    run(v1.update("/p", CgroupResources(cpu_quota=-1, pids_limit=-1)))
    assert read(root / "cpu/p", "cpu.cfs_quota_us") == "-1"
    assert read(root / "pids/p", "pids.max") == "max"


def test_v1_refuses_unified_keys_and_undoes_the_create(v1: CgroupManager) -> None:
    with pytest.raises(InvalidArgument, match="cgroup v2"):
        run(v1.create("/new/p", CgroupResources(unified={"memory.high": "1"})))
    assert not v1.exists("/new/p") and not v1.exists("/new")


def test_v1_stats_and_oom(v1: CgroupManager) -> None:
    root = v1.layout.root
    run(v1.create("/s", None))
    (root / "cpuacct/s/cpuacct.usage").write_text("123456789\n")
    (root / "cpuacct/s/cpuacct.usage_user").write_text("100\n")
    (root / "memory/s/memory.usage_in_bytes").write_text("1000000\n")
    (root / "memory/s/memory.limit_in_bytes").write_text("2000000\n")
    (root / "memory/s/memory.stat").write_text(
        "cache 5\nrss 7\ninactive_file 1\ntotal_rss 300000\ntotal_inactive_file 400000\n"
        "total_pgfault 42\ntotal_pgmajfault 3\n")
    (root / "memory/s/memory.oom_control").write_text("oom_kill_disable 0\noom_kill 2\n")
    (root / "pids/s/pids.current").write_text("5\n")
    st = run(v1.stats("/s"))
    assert isinstance(st, cgroups.CgroupStats)
    assert st.cpu_usage_ns == 123456789 and st.cpu_user_ns == 100
    assert st.memory_usage == 1000000 and st.memory_working_set == 600000
    assert st.memory_rss == 300000 and st.memory_limit == 2000000
    assert (st.page_faults, st.major_page_faults, st.pids_current) == (42, 3, 5)
    assert run(v1.oom_kill_count("/s")) == 2
    unlimited = run(v1.stats("/"))
    assert isinstance(unlimited, cgroups.CgroupStats) and unlimited.memory_limit is None


def test_v1_remove_is_child_first_idempotent_and_kills_nothing(v1: CgroupManager) -> None:
    root = v1.layout.root
    run(v1.create("/pod/crib-a/crib-c1", None))  # a container cgroup left below
    (root / "pids/pod/crib-a/crib-c1/cgroup.procs").write_text("4242\n")
    with pytest.raises(FailedPrecondition, match="4242"):
        run(v1.remove("/pod/crib-a"))
    assert v1.exists("/pod/crib-a/crib-c1")
    (root / "pids/pod/crib-a/crib-c1/cgroup.procs").write_text("")
    assert run(v1.pids("/pod")) == []
    run(v1.remove("/pod/crib-a"))
    assert not v1.exists("/pod/crib-a") and v1.exists("/pod")
    run(v1.remove("/pod/crib-a"))
    with pytest.raises(InvalidArgument):
        run(v1.remove("/"))


def test_remove_retries_ebusy(v1: CgroupManager, monkeypatch: pytest.MonkeyPatch) -> None:
    run(v1.create("/busy", None))
    real = cgroups._rmdir
    failures = {"left": 3}

    def flaky(path: Path) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EBUSY, "busy")
        real(path)

    monkeypatch.setattr(cgroups, "_rmdir", flaky)
    run(v1.remove("/busy"))
    assert not v1.exists("/busy") and failures["left"] == 0


# ---------------------------------------------------------------- v2


def test_v2_create_enables_controllers_and_converts(v2: CgroupManager) -> None:
    root = v2.layout.root
    path = pod_cgroup_path("kubepods-burstable.slice", "ab", CgroupDriver.SYSTEMD).path
    res = CgroupResources(cpu_shares=1024, cpu_quota=20000, cpu_period=50000,
                          memory_limit=100 << 20, memory_swap_limit=150 << 20,
                          hugepage_limits={"2MB": 4 << 20}, pids_limit=10,
                          cpuset_cpus="0", unified={"memory.high": "90000000"})
    run(v2.create(path, res))
    d = root / path.strip("/")
    assert read(root, "cgroup.subtree_control").split() == [
        "+cpuset", "+cpu", "+io", "+memory", "+hugetlb", "+pids"]
    assert read(d, "cpu.weight") == "39"
    assert read(d, "cpu.max") == "20000 50000"
    assert read(d, "memory.max") == str(100 << 20)
    assert read(d, "memory.swap.max") == str(50 << 20)
    assert read(d, "hugetlb.2MB.max") == str(4 << 20)
    assert read(d, "pids.max") == "10"
    assert read(d, "cpuset.cpus") == "0"
    assert read(d, "memory.high") == "90000000"


def test_v2_quota_without_period_and_unlimited(v2: CgroupManager) -> None:
    d = v2.layout.root / "q"
    run(v2.create("/q", CgroupResources(cpu_quota=-1, memory_limit=-1)))
    assert read(d, "cpu.max") == "max"
    assert read(d, "memory.max") == "max"
    assert read(d, "memory.swap.max") == "max"


@pytest.mark.parametrize("key", ["../escape", "cgroup.procs", "noperiod", ".hidden"])
def test_v2_refuses_bad_unified_keys(v2: CgroupManager, key: str) -> None:
    with pytest.raises(InvalidArgument, match="unified"):
        run(v2.create("/u", CgroupResources(unified={key: "1"})))
    assert not v2.exists("/u")


def test_v2_unknown_unified_file_is_invalid_argument(v2: CgroupManager) -> None:
    with pytest.raises(InvalidArgument, match=r"rdma\.max"):
        run(v2.create("/u", CgroupResources(unified={"rdma.max": "1"})))
    assert not v2.exists("/u")


def test_v2_stats_and_oom(v2: CgroupManager) -> None:
    d = v2.layout.root / "s"
    run(v2.create("/s", None))
    (d / "cpu.stat").write_text("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n")
    (d / "memory.current").write_text("5000\n")
    (d / "memory.stat").write_text("anon 3000\nfile 1000\ninactive_file 800\n"
                                   "pgfault 9\npgmajfault 1\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    (d / "pids.current").write_text("2\n")
    st = run(v2.stats("/s"))
    assert isinstance(st, cgroups.CgroupStats)
    assert (st.cpu_usage_ns, st.cpu_user_ns, st.cpu_system_ns) == (1500000, 1000000, 500000)
    assert (st.memory_usage, st.memory_working_set, st.memory_rss) == (5000, 4200, 3000)
    assert st.memory_limit is None
    assert (st.page_faults, st.major_page_faults, st.pids_current) == (9, 1, 2)
    assert run(v2.oom_kill_count("/s")) == 1
    run(v2.remove("/s"))
    assert not d.exists()


def test_from_cri_reads_linux_container_resources() -> None:
    from api import api_pb2

    msg = api_pb2.LinuxContainerResources(
        cpu_shares=256, cpu_quota=1000, cpu_period=10000, memory_limit_in_bytes=1 << 20,
        memory_swap_limit_in_bytes=2 << 20, cpuset_cpus="0-1", cpuset_mems="0",
        hugepage_limits=[api_pb2.HugepageLimit(page_size="2MB", limit=2 << 20)],
        unified={"memory.high": "1"})
    r = CgroupResources.from_cri(msg, pids_limit=7)
    assert (r.cpu_shares, r.cpu_quota, r.cpu_period) == (256, 1000, 10000)
    assert (r.memory_limit, r.memory_swap_limit) == (1 << 20, 2 << 20)
    assert (r.cpuset_cpus, r.cpuset_mems, r.pids_limit) == ("0-1", "0", 7)
    assert dict(r.hugepage_limits) == {"2MB": 2 << 20}
    assert dict(r.unified) == {"memory.high": "1"}
