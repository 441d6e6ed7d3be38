"""OciRuntime.run_detached (create + start in one runc call) against the real runc."""

from __future__ import annotations

import os

import pytest

from cri.errors import InvalidArgument, NotFound
from runtimeservice.oci import OciStatus
from tests.integration.ocihelpers import Harness, harness, run

__all__ = ["harness"]  # the shared fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


def test_run_detached_starts_the_process_and_returns_its_pid(harness: Harness) -> None:
    rt = harness.runtime
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["sleep", "1000"])
    pid_file = str(harness.base / "pid")

    async def scenario() -> None:
        pid = await rt.run_detached(cid, bundle, pid_file)
        st = await rt.state(cid)
        assert (st.status, st.pid) == (OciStatus.RUNNING, pid)
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            assert fh.read().split(b"\0")[0] == b"sleep"
        await rt.delete(cid, force=True)
        with pytest.raises(NotFound):
            await rt.state(cid)

    run(scenario())
    assert [p for p in os.listdir(harness.base) if p.endswith(".log")] == []  # its log file


def test_run_detached_failure_carries_the_runtime_message_and_leaves_nothing(
        harness: Harness) -> None:
    rt = harness.runtime
    cid = harness.new_id()
    bundle = harness.bundle(cid, ["nosuchcmd"])

    async def scenario() -> None:
        with pytest.raises(InvalidArgument) as info:
            await rt.run_detached(cid, bundle, str(harness.base / "pid"))
        assert 'exec: "nosuchcmd": executable file not found in $PATH' in info.value.message
        assert info.value.message.startswith(f"runc run {cid} failed")
        with pytest.raises(NotFound):
            await rt.state(cid)

    run(scenario())
    assert not os.path.exists(os.path.join(harness.state_root, cid))
    assert not any(os.path.exists(os.path.join(d, cid)) for d in harness.cgroup_dirs())
