"""OciRuntime and ExecSync against the real runc (crun where the host allows).

Bundles are hand-written: a busybox rootfs and `runc spec`'s config, read at
test time. Every container sits under a test-only cgroup parent
`/crib-test-<token>` that the harness removes from every hierarchy; teardown
checks that no process of the test (by state root or cgroup) is left.

The harness here is shared with test_monitor.py.
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

from cri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from runtimeservice.exec import exec_process, exec_sync, load_process
from runtimeservice.monitor import cgroup_mounts
from runtimeservice.oci import (
    OciRuntime,
    OciStatus,
    RuntimeFlavor,
    crun_unsupported_reason,
)

pytestmark = pytest.mark.integration

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
        return [
            os.path.join(mount, self.cgroup_parent.strip("/"))
            for mount, _, _ in cgroup_mounts()
            if os.path.isdir(os.path.join(mount, self.cgroup_parent.strip("/")))
        ]

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


# ---------------------------------------------------------------- runtime


def test_lifecycle_create_start_kill_delete(harness: Harness) -> None:
    rt = harness.runtime
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["sleep", "1000"])
    pid_file = str(harness.base / "pid")

    async def scenario() -> None:
        pid = await rt.create(cid, bundle, pid_file)
        st = await rt.state(cid)
        assert (st.status, st.pid, st.bundle) == (OciStatus.CREATED, pid, bundle)
        await rt.start(cid)
        assert (await rt.state(cid)).status is OciStatus.RUNNING
        assert await rt.kill(cid, signal.SIGKILL) is True
        for _ in range(2000):
            if (await rt.state(cid)).status is OciStatus.STOPPED:
                break
            await asyncio.sleep(0.01)
        assert (await rt.state(cid)).status is OciStatus.STOPPED
        assert await rt.kill(cid, "SIGTERM") is False  # nothing left to signal
        await rt.delete(cid)
        with pytest.raises(NotFound, match=cid):
            await rt.state(cid)
        await rt.delete(cid)  # idempotent
        await rt.delete(cid, force=True)

    run(scenario())


def test_pause_resume_update_and_forced_delete(harness: Harness) -> None:
    rt = harness.runtime
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["sleep", "1000"])

    async def scenario() -> None:
        await rt.create(cid, bundle, str(harness.base / "pid"))
        await rt.start(cid)
        await rt.pause(cid)
        assert (await rt.state(cid)).status is OciStatus.PAUSED
        await rt.resume(cid)
        assert (await rt.state(cid)).status is OciStatus.RUNNING
        await rt.update(cid, {"memory": {"limit": 64 * 1024 * 1024}})
        limit = Path("/sys/fs/cgroup/memory", harness.cgroup_parent.strip("/"), cid,
                     "memory.limit_in_bytes").read_text()
        assert int(limit) == 64 * 1024 * 1024
        with pytest.raises(InvalidArgument, match="unmarshal"):
            await rt.update(cid, '{"memory": {"limit": "lots"}}')
        with pytest.raises(FailedPrecondition, match="not stopped"):
            await rt.delete(cid)
        await rt.delete(cid, force=True)
        with pytest.raises(NotFound):
            await rt.state(cid)

    run(scenario())


def test_create_failure_reports_runtime_message_and_leaves_nothing(harness: Harness) -> None:
    rt = harness.runtime
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["nosuchcmd"])

    async def scenario() -> None:
        with pytest.raises(InvalidArgument) as info:
            await rt.create(cid, bundle, str(harness.base / "pid"))
        assert 'exec: "nosuchcmd": executable file not found in $PATH' in info.value.message
        with pytest.raises(NotFound):
            await rt.state(cid)

    run(scenario())
    assert not os.path.exists(os.path.join(harness.state_root, cid))
    assert not any(os.path.exists(os.path.join(d, cid)) for d in harness.cgroup_dirs())


def test_features_and_version_are_real(harness: Harness) -> None:
    async def scenario() -> None:
        feats = await harness.runtime.features()
        assert feats is not None
        assert "rbind" in feats.mount_options and feats.cgroup_v1
        assert await harness.runtime.features() is feats  # cached
        version = await harness.runtime.version()
        assert version.name == "runc" and version.version[0].isdigit() and version.spec

    run(scenario())


def test_crun_on_this_host_fails_clearly_or_runs(harness: Harness) -> None:
    if not os.access(CRUN, os.X_OK):
        pytest.skip(f"crun is not installed at {CRUN}")
    crun = OciRuntime("crun", CRUN, str(harness.base / "crun-state"))
    assert crun.flavor is RuntimeFlavor.CRUN
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["true"])
    reason = crun_unsupported_reason()

    async def scenario() -> None:
        assert await crun.features() is None or reason is None  # crun 1.8: no `features`
        assert (await crun.version()).name == "crun"
        if reason is None:
            await crun.create(cid, bundle, str(harness.base / "crun.pid"))
            await crun.delete(cid, force=True)
            return
        with pytest.raises(FailedPrecondition) as info:
            await crun.create(cid, bundle, str(harness.base / "crun.pid"))
        assert "hybrid" in info.value.message and "crun" in info.value.message
        with pytest.raises(NotFound):
            await crun.state(cid)

    run(scenario())
    if reason is not None:
        pytest.skip(f"crun lifecycle not exercised: {reason}")


# ---------------------------------------------------------------- ExecSync


def _running(harness: Harness) -> tuple[str, str]:
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["sleep", "1000"])

    async def start() -> None:
        await harness.runtime.create(cid, bundle, str(harness.base / f"{cid}.pid"))
        await harness.runtime.start(cid)

    run(start())
    return cid, bundle


def test_exec_sync_output_and_exit_code(harness: Harness) -> None:
    cid, bundle = _running(harness)
    base = load_process(bundle)

    async def scenario() -> None:
        proc = exec_process(base, ["sh", "-c", "echo out; echo err >&2; exit 7"])
        res = await exec_sync(harness.runtime, cid, proc, timeout=30)
        assert (res.exit_code, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
        res = await exec_sync(harness.runtime, cid, exec_process(base, ["true"]))
        assert (res.exit_code, res.stdout, res.stderr) == (0, b"", b"")
        env = exec_process(base, ["sh", "-c", "echo $FOO"], env=["FOO=bar"])
        assert (await exec_sync(harness.runtime, cid, env)).stdout == b"bar\n"

    run(scenario())


def test_exec_sync_bounds_output(harness: Harness) -> None:
    cid, bundle = _running(harness)
    proc = exec_process(load_process(bundle), ["sh", "-c", "head -c 300000 /dev/zero"])
    res = run(exec_sync(harness.runtime, cid, proc, output_limit=1000))
    assert res.exit_code == 0 and res.stdout_truncated and not res.stderr_truncated
    assert res.stdout.startswith(b"\0" * 1000)
    assert b"299000 more bytes dropped" in res.stdout[1000:]


def test_exec_sync_timeout_kills_the_process(harness: Harness) -> None:
    cid, bundle = _running(harness)
    proc = exec_process(load_process(bundle), ["sh", "-c", "sleep 300 & sleep 200"])
    before = {p for p, _ in harness.processes()}
    with pytest.raises(DeadlineExceeded, match="timed out"):
        run(exec_sync(harness.runtime, cid, proc, timeout=0.5))
    # Only the container's own init may remain: both sleeps and runc are gone.
    wait_for(lambda: {p for p, _ in harness.processes()} <= before, "exec'd processes to die")
    assert not [c for _, c in harness.processes() if "sleep 300" in c or "sleep 200" in c]


def test_exec_sync_missing_command_and_stopped_container(harness: Harness) -> None:
    cid, bundle = _running(harness)
    base = load_process(bundle)

    async def scenario() -> None:
        with pytest.raises(InvalidArgument) as info:
            await exec_sync(harness.runtime, cid, exec_process(base, ["nosuchcmd"]))
        assert 'exec: "nosuchcmd": executable file not found in $PATH' in info.value.message
        await harness.runtime.kill(cid, "KILL")
        while (await harness.runtime.state(cid)).status is not OciStatus.STOPPED:
            await asyncio.sleep(0.01)
        with pytest.raises(FailedPrecondition):
            await exec_sync(harness.runtime, cid, exec_process(base, ["true"]))
        with pytest.raises(NotFound):
            await exec_sync(harness.runtime, "no-such-container", exec_process(base, ["true"]))

    run(scenario())
