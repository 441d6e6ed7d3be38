"""Process accounting from /proc: who belongs to a runtime, its CPU time and memory.

A runtime's processes are its daemon, the daemon's direct children (runc, CNI
plugins while they run) and every process whose command line names the
runtime's private base directory (containerd's shims carry ``-address
<base>/containerd.sock``; conmon carries bundle, pid and exit paths under
crib's root). Pod infra processes (containerd's pause, crib's catatonit) are
counted apart: they are part of a pod, not of the runtime's machinery.

CPU time is utime+stime plus cutime+cstime (children already reaped, e.g. the
runc calls a shim or conmon made), so short-lived helpers are not lost.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
INFRA_COMMS = frozenset({"pause", "catatonit"})
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    cmdline: tuple[str, ...]
    starttime: int  # clock ticks after boot: (pid, starttime) names a process uniquely
    own_ticks: int  # utime + stime
    child_ticks: int  # cutime + cstime (reaped children)
    rss_kib: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.starttime)

    @property
    def cpu_seconds(self) -> float:
        return (self.own_ticks + self.child_ticks) / CLK_TCK


def parse_stat(pid: int, stat: str, cmdline: bytes) -> ProcInfo:
    """Build a ProcInfo from the text of /proc/<pid>/stat and the raw cmdline."""
    lpar, rpar = stat.index("("), stat.rindex(")")
    comm = stat[lpar + 1:rpar]
    f = stat[rpar + 2:].split()
    # f[0] is the state; the numbering below follows proc(5) minus 3.
    return ProcInfo(
        pid=pid, ppid=int(f[1]), comm=comm,
        cmdline=tuple(a.decode(errors="replace") for a in cmdline.split(b"\0") if a),
        starttime=int(f[19]), own_ticks=int(f[11]) + int(f[12]),
        child_ticks=int(f[13]) + int(f[14]), rss_kib=int(f[21]) * PAGE_KIB)


def read_proc(pid: int) -> ProcInfo | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        cmdline = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return parse_stat(pid, stat, cmdline)


def scan() -> list[ProcInfo]:
    """Every process now running (threads are not listed separately)."""
    found = []
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                found.append(info)
    return found


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages split among their users), 0 if unreadable."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Classified:
    runtime: list[ProcInfo]
    infra: list[ProcInfo]


def classify(procs: Iterable[ProcInfo], daemon_pid: int, marker: str) -> Classified:
    """Split out the runtime's processes and its pods' infra processes.

    `marker` is a string only the runtime's own helpers carry in their command
    line (its private base directory).
    """
    procs = list(procs)
    runtime_pids = {daemon_pid}
    for p in procs:
        if p.comm in INFRA_COMMS:
            continue
        if p.ppid == daemon_pid or any(marker in arg for arg in p.cmdline):
            runtime_pids.add(p.pid)
    runtime = [p for p in procs if p.pid in runtime_pids]
    infra = [p for p in procs if p.comm in INFRA_COMMS and p.ppid in runtime_pids]
    return Classified(runtime, infra)


def cpu_delta(before: Iterable[ProcInfo], after: Iterable[ProcInfo]) -> float:
    """CPU seconds the `after` processes used since `before` (new processes count whole)."""
    start = {p.key: p.own_ticks + p.child_ticks for p in before}
    ticks = 0
    for p in after:
        ticks += p.own_ticks + p.child_ticks - start.get(p.key, 0)
    return ticks / CLK_TCK


def rss_mib(procs: Iterable[ProcInfo]) -> float:
    return sum(p.rss_kib for p in procs) / 1024


def pss_mib(procs: Iterable[ProcInfo]) -> float:
    return sum(pss_kib(p.pid) for p in procs) / 1024


def descendants(procs: Iterable[ProcInfo], root: int) -> list[ProcInfo]:
    """Every process below `root` in the parent tree (not `root` itself)."""
    procs = list(procs)
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out: list[ProcInfo] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out
