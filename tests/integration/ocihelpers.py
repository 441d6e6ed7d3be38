"""The harness shared by the OCI runtime, monitor and container tests.

Bundles are hand-written: a busybox rootfs and `runc spec`'s config, read at
test time. Every container sits under a test-only cgroup parent
`/crib-test-<token>` that the harness removes from every hierarchy; teardown
checks that no process of the test (by state root or cgroup) is left.

Use the `harness` fixture by importing it into a test module (and listing it
in `__all__`, so the import is not "unused").
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtimeservice.cgroups import detect
from runtimeservice.oci import OciRuntime

RUNC = shutil.which("runc") or "/usr/sbin/runc"
CRUN = shutil.which("crun") or "/usr/bin/crun"
BUSYBOX = "/usr/bin/busybox"
APPLETS = ("sh", "echo", "sleep", "cat", "head", "tr", "seq", "stty", "true", "kill", "yes")

_spec_cache: dict[str, Any] = {}


def runc_spec() -> dict[str, Any]:
    """`runc spec`'s default config.json, generated once per session."""
    if not _spec_cache:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([RUNC, "spec"], cwd=d, check=True)
            _spec_cache.update(json.loads(Path(d, "config.json").read_text()))
    return copy.deepcopy(_spec_cache)


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    """Poll until predicate() is true (a generous limit, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def pid_gone(pid: int) -> bool:
    """The pid no longer runs (gone, or a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


@dataclass
class Harness:
    """Per-test state root, cgroup parent, bundles; cleans all of it up."""

    base: Path
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    created: list[str] = field(default_factory=list)
    conmon_pids: list[int] = field(default_factory=list)
    short_dirs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_root = str(self.base / "state")
        self.runtime = OciRuntime("runc", RUNC, self.state_root)
        self.cgroup_parent = f"/crib-test-{self.token}"
        self._n = 0

    def short_dir(self, prefix: str) -> str:
        """A short-path temporary directory (unix socket paths are limited)."""
        d = tempfile.mkdtemp(prefix=f"crib-{prefix}-")
        self.short_dirs.append(d)
        return d

    def new_id(self) -> str:
        self._n += 1
        cid = f"{self.token}{self._n:02d}" + secrets.token_hex(27)
        self.created.append(cid)
        return cid

    def bundle(
        self,
        cid: str,
        args: list[str],
        *,
        terminal: bool = False,
        memory_limit: int | None = None,
    ) -> str:
        root = self.base / "bundles" / cid
        bindir = root / "rootfs" / "bin"
        bindir.mkdir(parents=True)
        shutil.copy(BUSYBOX, bindir / "busybox")
        for applet in APPLETS:
            (bindir / applet).symlink_to("busybox")
        (root / "rootfs" / "tmp").mkdir()
        spec = runc_spec()
        spec["root"] = {"path": str(root / "rootfs"), "readonly": True}
        spec["process"]["args"] = args
        spec["process"]["terminal"] = terminal
        spec["process"]["env"] = ["PATH=/bin", "TERM=xterm"]
        spec["hostname"] = "crib-test"
        linux = spec["linux"]
        linux["cgroupsPath"] = f"{self.cgroup_parent}/{cid}"
        if memory_limit:
            linux.setdefault("resources", {})["memory"] = {
                "limit": memory_limit, "swap": memory_limit,
            }
        (root / "config.json").write_text(json.dumps(spec))
        return str(root)

    def cgroup_dirs(self) -> list[str]:
        dirs = [str(h / self.cgroup_parent.strip("/")) for h in detect().hierarchies()]
        return [d for d in dirs if os.path.isdir(d)]

    def processes(self) -> list[tuple[int, str]]:
        """Live processes of this test: by state root in argv or by cgroup."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                cgroups = Path(f"/proc/{entry}/cgroup").read_text()
            except OSError:
                continue
            if pid_gone(int(entry)):
                continue
            if self.state_root.encode() in cmdline or self.cgroup_parent + "/" in cgroups \
                    or self.cgroup_parent + "\n" in cgroups:
                found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
        return found

    def cleanup(self) -> list[str]:
        """Remove everything; return a list of leaks found on the way."""
        problems: list[str] = []
        for cid in self.created:
            subprocess.run([RUNC, "--root", self.state_root, "delete", "--force", cid],
                           capture_output=True)
        for pid in self.conmon_pids:
            try:
                wait_for(lambda p=pid: pid_gone(p), f"conmon {pid} to exit", 10)
            except AssertionError as e:
                problems.append(str(e))
        try:
            wait_for(lambda: not self.processes(), "test processes to end", 10)
        except AssertionError:
            left = self.processes()
            problems.append(f"processes left: {left}")
            for pid, _ in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not self.processes(), "leaked processes to die", 10)
        if os.path.isdir(self.state_root):
            left_ids = os.listdir(self.state_root)
            if left_ids:
                problems.append(f"runtime state left: {left_ids}")
        for top in self.cgroup_dirs():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                os.rmdir(dirpath)
        for d in self.short_dirs:
            shutil.rmtree(d, ignore_errors=True)
        return problems


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    problems = h.cleanup()
    assert not h.cgroup_dirs(), "test cgroups were not removed"
    assert not problems, problems


def run(coro: Any) -> Any:
    return asyncio.run(coro)
