"""Leave the machine as found: what the benchmark may leave behind, removed and checked.

Everything the two runtimes create is tied to names the benchmark chose: a
private base directory per runtime, a top-level cgroup per runtime, a bridge
and subnet per runtime. `HostGuard` records the few shared things that exist
before (``/var/lib/cni``, ``/run/containerd``, ``/run/netns``, ip_forward),
cleans by those names only, and `verify()` reports each check it made.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hack.benchmarks import procstat

MNT_DETACH = 2
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
CGROUP_FS = ("cgroup", "cgroup2")
CNI_CACHE = Path("/var/lib/cni/results")  # libcni's default, where containerd 1.6 caches
_libc = ctypes.CDLL(None, use_errno=True)


def _unescape(field_: str) -> str:
    """Decode the octal escapes (\\040 for a space) of a mountinfo path."""
    out, i = [], 0
    while i < len(field_):
        digits = field_[i + 1:i + 4]
        if field_[i] == "\\" and len(digits) == 3 and all(c in "01234567" for c in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in mount order."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        found.append((_unescape(left.split()[4]), right.split()[0]))
    return found


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [m for m, _ in mountinfo() if m == str(path) or m.startswith(prefix)]


def unmount_under(path: Path) -> list[str]:
    """Unmount (lazily if busy) everything at or below `path`, innermost first."""
    errors = []
    for _ in range(5):
        points = mounts_under(path)
        if not points:
            return []
        for point in reversed(points):
            if _libc.umount2(point.encode(), 0) != 0 and \
                    _libc.umount2(point.encode(), MNT_DETACH) != 0:
                errors.append(f"umount {point}: {os.strerror(ctypes.get_errno())}")
    return errors + [f"still mounted: {m}" for m in mounts_under(path)]


def cgroup_roots() -> list[Path]:
    return [Path(m) for m, fs in mountinfo() if fs in CGROUP_FS and m.startswith("/sys/fs/cgroup")]


def cgroup_dirs(name: str) -> list[Path]:
    """`<controller mount>/<name>` for every cgroup hierarchy where it exists."""
    return [root / name for root in cgroup_roots() if (root / name).is_dir()]


def remove_cgroup_tree(top: Path, attempts: int = 20) -> list[str]:
    """rmdir `top` and every cgroup below it, deepest first (retried while tasks leave)."""
    for _ in range(attempts):
        if not top.exists():
            return []
        dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts),
                      reverse=True)
        for d in dirs:
            with contextlib.suppress(OSError):
                d.rmdir()
        time.sleep(0.1)
    return [f"cgroup {top} could not be removed"] if top.exists() else []


def pids_in_cgroup(name: str) -> list[int]:
    """Processes whose cgroup (in any hierarchy) is `/<name>` or below it."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "cgroup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if path == f"/{name}" or path.startswith(f"/{name}/"):
                found.append(int(entry.name))
                break
    return found


def pids_with_marker(marker: str) -> list[int]:
    """Processes with `marker` in an argument of their command line (never this one)."""
    return [p.pid for p in procstat.scan()
            if p.pid != os.getpid() and any(marker in a for a in p.cmdline)]


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL exactly these pids and wait for them to go; returns those still there."""
    targets = {p: procstat.read_proc(p) for p in pids}
    keys = {p: info.starttime for p, info in targets.items() if info is not None}
    for pid in keys:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p, start in keys.items()
                 if (i := procstat.read_proc(p)) is not None and i.starttime == start]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def links_with_master(name: str) -> list[str]:
    brif = Path("/sys/class/net", name, "brif")
    return sorted(p.name for p in brif.iterdir()) if brif.is_dir() else []


def delete_link(name: str) -> list[str]:
    if not link_exists(name):
        return []
    out = _run(["ip", "link", "del", name])
    return [] if out.returncode == 0 else [f"ip link del {name}: {out.stderr.strip()}"]


def iptables_rules(patterns: Iterable[str]) -> list[tuple[str, str]]:
    """(table, rule) of every iptables rule that mentions one of `patterns`."""
    pats = [p for p in patterns if p]
    out = _run(["iptables-save"])
    table, found = "", []
    for line in out.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and any(p in line for p in pats):
            found.append((table, line))
    return found


def delete_iptables_rules(patterns: Iterable[str]) -> list[str]:
    """Delete the matching rules, then flush and delete CNI chains they jumped to."""
    errors = []
    chains: set[tuple[str, str]] = set()
    for table, rule in iptables_rules(patterns):
        args = rule.split()
        if "-j" in args:
            target = args[args.index("-j") + 1]
            if target.startswith("CNI-"):
                chains.add((table, target))
        out = _run(["iptables", "-t", table, "-D", *args[1:]])
        if out.returncode != 0:
            errors.append(f"iptables -t {table} -D {' '.join(args[1:])}: {out.stderr.strip()}")
    for table, chain in sorted(chains):
        _run(["iptables", "-t", table, "-F", chain])
        out = _run(["iptables", "-t", table, "-X", chain])
        if out.returncode != 0:
            errors.append(f"iptables -t {table} -X {chain}: {out.stderr.strip()}")
    return errors


def _cache_namespace(entry: Path) -> str:
    """K8S_POD_NAMESPACE of a libcni cache entry ('' when unreadable)."""
    try:
        doc = json.loads(entry.read_text())
        return str(dict(doc.get("cniArgs") or []).get("K8S_POD_NAMESPACE", ""))
    except (OSError, ValueError, TypeError):
        return ""


def cni_cache_entries(o: Owned) -> list[Path]:
    """libcni's cache entries of `o`'s pods (its network's, and the loopback network's)."""
    if not CNI_CACHE.is_dir():
        return []
    return [e for e in CNI_CACHE.iterdir()
            if e.name.startswith(f"{o.network_name}-") or _cache_namespace(e) == o.pod_namespace]


def _listing(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


@dataclass
class Owned:
    """What one runtime's run may leave behind, by the names the benchmark gave it."""

    name: str
    base: Path
    cgroup_root: str
    bridge: str
    subnet: str
    network_name: str
    pod_namespace: str  # the pods' namespace, in every CNI cache entry as K8S_POD_NAMESPACE
    process_markers: list[str] = field(default_factory=list)
    # Files outside `base` the runtime made (containerd's shim sockets), read from `base`.
    outside_files: Callable[[], list[Path]] = field(default=lambda: [])


@dataclass
class HostGuard:
    """Shared host state recorded before the run; restored and checked after it."""

    owned: list[Owned]
    ip_forward: str = ""
    had_paths: dict[str, set[str] | None] = field(default_factory=dict)
    removed_files: list[Path] = field(default_factory=list)
    # Shared places the runtimes write to although told otherwise (see containerd.py).
    # Pinned network namespaces are not here: both runtimes pin them under their
    # base directory, so "no mount under <base>" covers them.
    shared_paths: tuple[str, ...] = ("/var/lib/cni", "/run/containerd")

    def record(self) -> None:
        self.ip_forward = IP_FORWARD.read_text().strip()
        for p in self.shared_paths:
            path = Path(p)
            self.had_paths[p] = _listing(path) if path.exists() else None

    def clean(self) -> list[str]:
        """Remove everything owned; returns the problems met (empty when all went)."""
        errors: list[str] = []
        for o in self.owned:
            pids = set(pids_in_cgroup(o.cgroup_root))
            for marker in o.process_markers:
                pids.update(pids_with_marker(marker))
            pids.discard(os.getpid())
            if pids:
                errors += [f"{o.name}: pid {p} would not die" for p in kill_and_wait(pids)]
            for f in o.outside_files():
                f.unlink(missing_ok=True)
                self.removed_files.append(f)
            errors += unmount_under(o.base)
            for d in cgroup_dirs(o.cgroup_root):
                errors += remove_cgroup_tree(d)
            errors += delete_iptables_rules([o.subnet, o.bridge])
            errors += delete_link(o.bridge)
            self._clean_cni_cache(o)
            if o.base.exists() and not mounts_under(o.base):
                shutil.rmtree(o.base, ignore_errors=True)
        self._restore_shared()
        if IP_FORWARD.read_text().strip() != self.ip_forward and self.ip_forward == "0":
            IP_FORWARD.write_text("0\n")
        return errors

    def _clean_cni_cache(self, o: Owned) -> None:
        for entry in cni_cache_entries(o):
            entry.unlink(missing_ok=True)

    def _restore_shared(self) -> None:
        """Shared directories that did not exist before go again, if only ours is in them."""
        for p, before in self.had_paths.items():
            path = Path(p)
            if before is None and path.is_dir() and not mounts_under(path):
                leftovers = [f for f in path.rglob("*") if not f.is_dir()]
                if not leftovers:
                    shutil.rmtree(path, ignore_errors=True)

    def verify(self) -> list[tuple[bool, str]]:
        """(ok, what was checked) for every check; all ok means the machine is as found."""
        checks: list[tuple[bool, str]] = []
        for o in self.owned:
            procs = set(pids_in_cgroup(o.cgroup_root))
            for marker in o.process_markers:
                procs.update(pids_with_marker(marker))
            checks.append((not procs, f"{o.name}: no process in cgroup /{o.cgroup_root} or "
                                      f"naming {', '.join(o.process_markers)}"
                                      + (f" (found {sorted(procs)})" if procs else "")))
            m = mounts_under(o.base)
            checks.append((not m, f"{o.name}: no mount (rootfs, netns/ipc/uts pin, shm) under "
                                  f"{o.base}" + (f" ({m})" if m else "")))
            checks.append((not o.base.exists(), f"{o.name}: {o.base} removed"))
            cg = cgroup_dirs(o.cgroup_root)
            checks.append((not cg, f"{o.name}: no cgroup /{o.cgroup_root} in "
                                   f"{len(cgroup_roots())} hierarchies"
                                   + (f" ({[str(c) for c in cg]})" if cg else "")))
            rules = iptables_rules([o.subnet, o.bridge])
            checks.append((not rules, f"{o.name}: no iptables rule for {o.subnet}/{o.bridge}"
                                      + (f" ({rules})" if rules else "")))
            checks.append((not link_exists(o.bridge), f"{o.name}: no link {o.bridge}"))
            cached = [e.name for e in cni_cache_entries(o)]
            checks.append((not cached, f"{o.name}: no CNI cache entry in {CNI_CACHE} for "
                                       f"{o.network_name} or pods in {o.pod_namespace}"
                                       + (f" ({cached})" if cached else "")))
        left = [str(f) for f in self.removed_files if f.exists()]
        checks.append((not left, f"{len(self.removed_files)} shim sockets outside the base "
                                 "directories removed" + (f" ({left})" if left else "")))
        for p, before in self.had_paths.items():
            now = _listing(Path(p)) if Path(p).exists() else None
            if before is None:
                checks.append((now is None, f"{p} absent, as before"))
            else:
                new = sorted((now or set()) - before)
                checks.append((not new, f"{p}: no new entries" + (f" ({new})" if new else "")))
        fwd = IP_FORWARD.read_text().strip()
        checks.append((fwd == self.ip_forward, f"net.ipv4.ip_forward = {fwd} "
                                               f"(was {self.ip_forward})"))
        return checks
