"""Benchmark process accounting: /proc/<pid>/stat parsing, classification, CPU deltas."""

from __future__ import annotations

from hack.benchmarks.procstat import (
    CLK_TCK,
    PAGE_KIB,
    ProcInfo,
    classify,
    cpu_delta,
    descendants,
    parse_stat,
    rss_mib,
)


def stat_line(pid: int, comm: str, ppid: int, utime: int = 0, stime: int = 0,
              cutime: int = 0, cstime: int = 0, start: int = 100, rss: int = 10) -> str:
    # fields 3..24 of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice threads itreal starttime vsize rss
    rest = ["S", ppid, 1, 1, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, cstime, 20, 0, 1, 0,
            start, 1000, rss]
    return f"{pid} ({comm}) " + " ".join(str(x) for x in rest) + " 0 0"


def proc(pid: int, comm: str, ppid: int, cmdline: tuple[str, ...] = (), ticks: int = 0,
         child: int = 0, start: int = 100, rss_kib: int = 1024) -> ProcInfo:
    return ProcInfo(pid, ppid, comm, cmdline, start, ticks, child, rss_kib)


def test_parse_stat_reads_the_fields_after_the_command_name() -> None:
    info = parse_stat(42, stat_line(42, "weird ) name", 7, 3, 4, 5, 6, start=999, rss=25),
                      b"/usr/bin/x\0--flag\0value\0")
    assert info.pid == 42 and info.ppid == 7 and info.comm == "weird ) name"
    assert info.cmdline == ("/usr/bin/x", "--flag", "value")
    assert info.own_ticks == 7 and info.child_ticks == 11
    assert info.starttime == 999
    assert info.rss_kib == 25 * PAGE_KIB
    assert info.cpu_seconds == 18 / CLK_TCK
    assert info.key == (42, 999)


def test_classify_takes_daemon_children_and_marked_helpers_but_not_infra() -> None:
    base = "/tmp/crib-compare-x/containerd"
    procs = [
        proc(10, "containerd", 1),
        proc(11, "runc", 10),  # a child of the daemon
        proc(20, "containerd-shim", 1, ("/usr/bin/containerd-shim-runc-v2", "-address",
                                         f"{base}/containerd.sock")),
        proc(21, "pause", 20),  # the pod's infra process
        proc(22, "sh", 20),  # a container: neither runtime nor infra
        proc(30, "containerd-shim", 1, ("shim", "-address", "/run/other.sock")),  # not ours
        proc(31, "pause", 30),
    ]
    got = classify(procs, 10, base)
    assert sorted(p.pid for p in got.runtime) == [10, 11, 20]
    assert [p.pid for p in got.infra] == [21]


def test_cpu_delta_counts_growth_and_new_processes_whole() -> None:
    before = [proc(1, "d", 0, ticks=100, child=10), proc(2, "s", 1, ticks=5)]
    after = [proc(1, "d", 0, ticks=150, child=30),  # +70
             proc(2, "s", 1, ticks=5, start=555),  # pid reused: a new process, counts whole
             proc(3, "s", 1, ticks=20)]  # new: +20
    assert cpu_delta(before, after) == (70 + 5 + 20) / CLK_TCK


def test_rss_and_descendants() -> None:
    procs = [proc(1, "a", 0, rss_kib=1024), proc(2, "b", 1, rss_kib=2048), proc(3, "c", 2),
             proc(4, "d", 9)]
    assert rss_mib(procs[:2]) == 3.0
    assert sorted(p.pid for p in descendants(procs, 1)) == [2, 3]
    assert descendants(procs, 3) == []
