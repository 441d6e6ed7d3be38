"""conmon integration: create through conmon, CRI logs, exit files and the
watcher, kills, create failures, log reopen, attach, a lost monitor, and a
monitor that outlives the process that started it. Real runc + conmon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cri.errors import FailedPrecondition, InvalidArgument
from runtimeservice.cgroups import CgroupManager, detect
from runtimeservice.crilog import Stream, iter_records, read_log, reassemble
from runtimeservice.exitwatch import (
    REASON_MONITOR_LOST,
    UNKNOWN_EXIT_CODE,
    ExitWatcher,
    lost_monitor_exit,
)
from runtimeservice.monitor import (
    ATTACH_PIPE_STDOUT,
    Monitor,
    MonitorConfig,
    MonitoredContainer,
    MonitorSpec,
    monitor_alive,
)
from runtimeservice.oci import OciStatus
from tests.integration.ocihelpers import Harness, harness, pid_gone, run, wait_for

pytestmark = pytest.mark.integration
__all__ = ["harness"]  # the shared fixture

CONMON = "/usr/bin/conmon"


class Env:
    """A Monitor wired to the harness: short socket dir, test conmon cgroup."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.exit_dir = str(h.base / "exits")
        self.monitor = Monitor(MonitorConfig(
            conmon_path=CONMON,
            exit_dir=self.exit_dir,
            socket_dir=h.short_dir("s"),
            conmon_cgroup=f"{h.cgroup_parent}/conmon",
        ))

    def spec(self, args: list[str], **kw: object) -> MonitorSpec:
        cid = self.h.new_id()
        bundle_kw = {k: kw.pop(k) for k in ("memory_limit",) if k in kw}
        bundle = self.h.bundle(cid, args, terminal=bool(kw.get("terminal")), **bundle_kw)
        return MonitorSpec(
            container_id=cid, bundle=bundle, persist_dir=str(self.h.base / "persist" / cid),
            log_path=str(self.h.base / "logs" / f"{cid}.log"), **kw,  # type: ignore[arg-type]
        )

    async def create(self, spec: MonitorSpec) -> MonitoredContainer:
        mc = await self.monitor.create(self.h.runtime, spec)
        self.h.conmon_pids.append(mc.conmon_pid)
        return mc

    async def wait_exit(self, spec: MonitorSpec) -> int:
        for _ in range(3000):
            info = self.monitor.read_exit(spec.container_id, spec.persist_dir)
            if info is not None:
                return info.exit_code
            await asyncio.sleep(0.01)
        raise AssertionError(f"no exit file for {spec.container_id}")


@pytest.fixture
def env(harness: Harness) -> Env:
    return Env(harness)


def test_create_start_logs_exit_code_and_watcher(env: Env) -> None:
    spec = env.spec(["sh", "-c", "echo hello; echo oops >&2; echo bye; exit 3"])
    events: list[tuple[str, int, int]] = []

    async def scenario() -> None:
        watcher = ExitWatcher(env.exit_dir, lambda *a: events.append(a))
        await watcher.start()
        assert watcher.uses_inotify
        t0 = time.time_ns()
        mc = await env.create(spec)
        st = await env.h.runtime.state(spec.container_id)
        assert (st.status, st.pid) == (OciStatus.CREATED, mc.pid)
        assert monitor_alive(mc.conmon_pid, spec.container_id)
        placed = Path(f"/proc/{mc.conmon_pid}/cgroup").read_text()
        assert f":memory:{env.h.cgroup_parent}/conmon\n" in placed  # not the pod's cgroup
        assert os.path.exists(env.monitor.attach_socket_path(spec.container_id))
        await env.h.runtime.start(spec.container_id)
        assert await env.wait_exit(spec) == 3
        while not events:
            await asyncio.sleep(0.01)
        await watcher.close()
        (cid, code, finished), = events
        assert (cid, code) == (spec.container_id, 3) and finished >= t0 - 10**9
        wait_for(lambda: pid_gone(mc.conmon_pid), "conmon to exit")
        assert Path(spec.persist_dir, "exit").read_text() == "3"
        entries = read_log(spec.log_path)
        assert [(e.stream, e.text) for e in entries if e.stream is Stream.STDOUT] == [
            (Stream.STDOUT, "hello"), (Stream.STDOUT, "bye")]
        assert [(e.stream, e.text) for e in entries if e.stream is Stream.STDERR] == [
            (Stream.STDERR, "oops")]
        assert all(t0 - 10**9 <= e.timestamp_ns <= time.time_ns() for e in entries)
        await env.h.runtime.delete(spec.container_id)
        await env.monitor.cleanup(spec.container_id, spec.bundle, spec.persist_dir)

    run(scenario())


def test_long_line_is_split_into_partial_records(env: Env) -> None:
    spec = env.spec(["sh", "-c", "head -c 20000 /dev/zero | tr '\\0' x; echo; echo next"])

    async def scenario() -> None:
        await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        assert await env.wait_exit(spec) == 0

    run(scenario())
    records = list(iter_records(Path(spec.log_path).read_bytes()))
    assert len(records) >= 4 and records[0].partial and not records[-1].partial
    assert all(len(r.content) <= 8192 for r in records)
    entries = list(reassemble(records))
    assert [(len(e.content), e.complete) for e in entries] == [(20000, True), (4, True)]
    assert entries[0].content == b"x" * 20000 and entries[1].text == "next"


TRAP_TERM = ["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.05; done"]


@pytest.mark.parametrize(("sig", "args", "code"), [
    (signal.SIGTERM, TRAP_TERM, 42),  # pid 1 only dies of signals it handles
    (signal.SIGKILL, ["sleep", "1000"], 137),
])
def test_kill_records_exit_code(env: Env, sig: signal.Signals, args: list[str], code: int) -> None:
    spec = env.spec(args)

    async def scenario() -> None:
        mc = await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        assert await env.h.runtime.kill(spec.container_id, sig)
        assert await env.wait_exit(spec) == code
        wait_for(lambda: pid_gone(mc.pid) and pid_gone(mc.conmon_pid), "exit")

    run(scenario())


def test_create_failure_carries_runtime_message_and_leaves_nothing(env: Env) -> None:
    spec = env.spec(["nosuchcmd"])

    async def scenario() -> None:
        with pytest.raises(InvalidArgument) as info:
            await env.monitor.create(env.h.runtime, spec)
        assert 'exec: "nosuchcmd": executable file not found in $PATH' in info.value.message

    run(scenario())
    assert not os.listdir(env.h.state_root)
    assert not env.h.processes()
    assert not [d for d in env.h.cgroup_dirs()
                if os.path.exists(os.path.join(d, spec.container_id))]
    assert not os.path.exists(env.monitor.exit_file(spec.container_id))
    assert not os.path.lexists(os.path.join(env.monitor.config.socket_dir, spec.container_id))
    assert not os.path.exists(os.path.join(spec.bundle, "ctl"))


def test_conmon_argv_rejects_colon_in_log_path(env: Env) -> None:
    spec = env.spec(["true"])
    bad = MonitorSpec(spec.container_id, spec.bundle, spec.persist_dir, "/tmp/a:b.log")
    with pytest.raises(InvalidArgument, match="':'"):
        env.monitor.conmon_argv(env.h.runtime, bad)


def _numbers(path: str) -> list[int]:
    """Line numbers in a log being written: complete records only."""
    data = Path(path).read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    return [int(e.text.removeprefix("line")) for e in reassemble(iter_records(data))]


def test_reopen_log_after_rename(env: Env) -> None:
    script = "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.02; done"
    spec = env.spec(["sh", "-c", script])
    rotated = spec.log_path + ".1"

    async def scenario() -> None:
        await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        wait_for(lambda: len(_numbers(spec.log_path)) >= 3, "first lines")
        os.rename(spec.log_path, rotated)
        await env.monitor.reopen_log(spec.container_id, spec.log_path)
        wait_for(lambda: len(_numbers(spec.log_path)) >= 3, "lines in the new file")
        await env.h.runtime.kill(spec.container_id, "KILL")
        await env.wait_exit(spec)
        with pytest.raises(FailedPrecondition, match="not running"):
            await env.monitor.reopen_log(spec.container_id, spec.log_path)

    run(scenario())
    old, new = _numbers(rotated), _numbers(spec.log_path)
    assert max(old) < min(new)
    assert old + new == list(range(len(old) + len(new)))  # nothing lost or repeated


def test_attach_socket_relays_stdin_and_prefixes_output(env: Env) -> None:
    spec = env.spec(["cat"], stdin=True, stdin_once=True)

    async def scenario() -> None:
        await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(env.monitor.attach_socket_path(spec.container_id))
            s.sendall(b"ping\n")
            s.settimeout(20)
            data = await asyncio.to_thread(s.recv, 8193)
            assert data == bytes([ATTACH_PIPE_STDOUT]) + b"ping\n"
        # stdin_once: closing the attach connection closes stdin, cat ends.
        assert await env.wait_exit(spec) == 0

    run(scenario())
    assert [e.text for e in read_log(spec.log_path)] == ["ping"]


def test_terminal_resize(env: Env) -> None:
    spec = env.spec(["sh", "-c", "read x; stty size; read y"], terminal=True, stdin=True)

    async def scenario() -> None:
        await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        await env.monitor.resize(spec.container_id, 33, 77)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(env.monitor.attach_socket_path(spec.container_id))
            s.sendall(b"go\n")
            wait_for(lambda: "33 77" in Path(spec.log_path).read_text(), "stty output")
            s.sendall(b"done\n")
            assert await env.wait_exit(spec) == 0

    run(scenario())


def test_oom_kill_is_recorded(env: Env) -> None:
    # A shell variable that doubles until the 16 MiB limit kills the container.
    script = "x=xxxxxxxxxxxxxxxx; while true; do x=$x$x; done"
    spec = env.spec(["sh", "-c", script], memory_limit=16 * 1024 * 1024)
    cgroup = f"{env.h.cgroup_parent}/{spec.container_id}"

    async def scenario() -> None:
        await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        assert await env.wait_exit(spec) == 137
        assert await CgroupManager(detect()).oom_kill_count(cgroup) >= 1

    run(scenario())
    wait_for(lambda: os.path.exists(os.path.join(spec.persist_dir, "oom")), "conmon's oom file")
    info = env.monitor.read_exit(spec.container_id, spec.persist_dir)
    assert info is not None and info.oom_killed and info.exit_code == 137


def test_killed_conmon_is_detected(env: Env) -> None:
    spec = env.spec(["sleep", "1000"])

    async def scenario() -> MonitoredContainer:
        mc = await env.create(spec)
        await env.h.runtime.start(spec.container_id)
        return mc

    mc = run(scenario())
    assert monitor_alive(mc.conmon_pid, spec.container_id)
    os.kill(mc.conmon_pid, signal.SIGKILL)
    wait_for(lambda: not monitor_alive(mc.conmon_pid, spec.container_id), "conmon to die")
    assert env.monitor.read_exit(spec.container_id, spec.persist_dir) is None
    lost = lost_monitor_exit(spec.container_id, mc.conmon_pid)
    assert (lost.exit_code, lost.reason) == (UNKNOWN_EXIT_CODE, REASON_MONITOR_LOST)
    assert str(mc.conmon_pid) in lost.message
    with pytest.raises(FailedPrecondition, match="not running"):  # nobody reads the FIFO
        run(env.monitor.reopen_log(spec.container_id, spec.log_path, mc.conmon_pid))


CHILD = """
import asyncio, json, sys
from runtimeservice.monitor import Monitor, MonitorConfig, MonitorSpec
from runtimeservice.oci import OciRuntime
a = json.loads(sys.argv[1])
async def main():
    rt = OciRuntime("runc", a["runc"], a["root"])
    mon = Monitor(MonitorConfig(**a["config"]))
    mc = await mon.create(rt, MonitorSpec(**a["spec"]))
    await rt.start(a["spec"]["container_id"])
    print(json.dumps([mc.pid, mc.conmon_pid]))
asyncio.run(main())
"""


def test_container_and_conmon_outlive_the_starting_process(env: Env) -> None:
    spec = env.spec(["sleep", "1000"])
    cfg = env.monitor.config
    arg = json.dumps({
        "runc": env.h.runtime.path, "root": env.h.state_root,
        "config": {"conmon_path": cfg.conmon_path, "exit_dir": cfg.exit_dir,
                   "socket_dir": cfg.socket_dir, "conmon_cgroup": cfg.conmon_cgroup},
        "spec": {"container_id": spec.container_id, "bundle": spec.bundle,
                 "persist_dir": spec.persist_dir, "log_path": spec.log_path},
    })
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), arg], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pid, conmon_pid = json.loads(done.stdout)
    env.h.conmon_pids.append(conmon_pid)
    assert monitor_alive(conmon_pid, spec.container_id) and not pid_gone(pid)
    assert Path(f"/proc/{conmon_pid}/stat").read_text().split()[3] != str(os.getpid())
    # Its own session and process group: a signal to ours (or the daemon's) misses it.
    assert os.getsid(conmon_pid) == conmon_pid != os.getsid(0)
    assert os.getpgid(conmon_pid) != os.getpgid(0)

    async def scenario() -> None:
        assert (await env.h.runtime.state(spec.container_id)).status is OciStatus.RUNNING
        await env.h.runtime.kill(spec.container_id, "KILL")
        assert await env.wait_exit(spec) == 137  # the orphaned conmon still records it

    run(scenario())


def test_exit_watcher_reports_existing_and_new_files_once(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    async def scenario() -> None:
        (tmp_path / "old").write_text("5")
        (tmp_path / "junk").write_text("not a number")
        watcher = ExitWatcher(str(tmp_path), lambda c, code, _t: seen.append((c, code)))
        await watcher.start()
        assert seen == [("old", 5)]
        tmp = tmp_path / "new.AbC123"  # conmon's temp-then-rename pattern
        tmp.write_text("0")
        os.rename(tmp, tmp_path / "new")
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        watcher._scan()  # a rescan reports nothing twice
        await watcher.close()

    run(scenario())
    assert seen == [("old", 5), ("new", 0)]
