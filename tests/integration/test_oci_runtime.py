"""OciRuntime and ExecSync against the real runc (crun where the host allows).

The harness (bundles, test cgroup parent, leak checks) is in ocihelpers.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from cri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from runtimeservice.exec import exec_process, exec_sync, load_process
from runtimeservice.oci import OciRuntime, OciStatus, RuntimeFlavor
from runtimeservice.ocierrors import crun_unsupported_reason
from tests.integration.ocihelpers import CRUN, Harness, harness, run, wait_for

__all__ = ["harness"]  # the shared fixture

pytestmark = pytest.mark.integration

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
