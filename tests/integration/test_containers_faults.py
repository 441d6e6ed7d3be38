"""Bad input and faults, through the ContainerManager on real runc + conmon:
each fails clearly and leaves nothing behind; a killed monitor is noticed."""

from __future__ import annotations

import dataclasses
import os
import re
import signal

import pytest

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, NotFound
from runtimeservice.container import ContainerState
from runtimeservice.containers import ContainerManager
from runtimeservice.exitwatch import REASON_MONITOR_LOST, UNKNOWN_EXIT_CODE
from runtimeservice.monitor import monitor_alive
from runtimeservice.ocierrors import crun_unsupported_reason
from runtimeservice.sandbox import SandboxState
from tests.integration.containerenv import (
    ContainerEnv,
    await_until,
    busybox_rootfs,
    cenv,
    run,
)

pytestmark = pytest.mark.integration
__all__ = ["busybox_rootfs", "cenv"]


def _nothing_made(cenv: ContainerEnv, mgr: ContainerManager) -> None:
    assert cenv.leftovers() == []
    assert mgr.store.all() == []


def test_image_not_pulled_is_not_found(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            config = cenv.config("c", ["true"])
            config.image.image = "example.com/not/pulled:1"
            with pytest.raises(NotFound, match=re.escape("example.com/not/pulled:1")):
                await mgr.create(cenv.request(pod, config))
            _nothing_made(cenv, mgr)

    run(scenario())


def test_missing_command_fails_clearly_and_leaves_nothing(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            req = cenv.request(pod, cenv.config("bad", ["nosuchcmd"]))
            with pytest.raises(InvalidArgument) as err:
                await mgr.create(req)
            assert 'exec: "nosuchcmd": executable file not found in $PATH' in err.value.message
            _nothing_made(cenv, mgr)
            # The name is free again: a fixed request succeeds.
            cid = await mgr.create(cenv.request(pod, cenv.config("bad", ["true"])))
            await mgr.remove(cid)

    run(scenario())


def test_missing_mount_source_and_escaping_log_path(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            config = cenv.config("m", ["true"])
            config.mounts.add(container_path="/data", host_path=str(cenv.base / "absent"))
            with pytest.raises(NotFound, match=r"absent.*does not exist"):
                await mgr.create(cenv.request(pod, config))
            for bad in ("../escape.log", "a/../../escape.log", "/var/log/abs.log"):
                config = cenv.config("l", ["true"])
                config.log_path = bad
                with pytest.raises(InvalidArgument, match="log_path"):
                    await mgr.create(cenv.request(pod, config))
            _nothing_made(cenv, mgr)

    run(scenario())


def test_stopped_or_unknown_sandbox_is_refused(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            cenv.sandboxes.put(dataclasses.replace(pod, state=SandboxState.NOTREADY))
            with pytest.raises(FailedPrecondition, match="not ready"):
                await mgr.create(cenv.request(pod, cenv.config("c", ["true"])))
            other = api_pb2.CreateContainerRequest(pod_sandbox_id="f" * 64,
                                                   config=cenv.config("c", ["true"]))
            with pytest.raises(NotFound):
                await mgr.create(other)
            _nothing_made(cenv, mgr)

    run(scenario())


def test_killed_monitor_reports_exit_255_and_removes(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            cid = await mgr.create(cenv.request(pod, cenv.config("c", ["sleep", "1000"])))
            await mgr.start_container(cid)
            rec = mgr.store.get(cid)
            os.kill(rec.conmon_pid, signal.SIGKILL)
            await await_until(lambda: mgr.store.get(cid).state is ContainerState.EXITED,
                              "the lost monitor to be noticed")
            st = (await mgr.status(cid)).status
            assert (st.exit_code, st.reason) == (UNKNOWN_EXIT_CODE, REASON_MONITOR_LOST)
            assert str(rec.conmon_pid) in st.message
            assert not [p for p, _ in cenv.processes() if p == rec.pid]
            await mgr.stop(cid, 10)  # no hang
            await mgr.remove(cid)
            assert not monitor_alive(rec.conmon_pid, cid)

    run(scenario())
    assert cenv.leftovers() == []


def test_crun_lifecycle_or_the_reason_it_cannot_run(cenv: ContainerEnv) -> None:
    reason = crun_unsupported_reason()
    if not os.access(cenv.runtimes["crun"].path, os.X_OK):
        pytest.skip("crun is not installed")

    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox(handler="crun")
            req = cenv.request(pod, cenv.config("c", ["sh", "-c", "exit 4"]))
            if reason is not None:
                with pytest.raises(FailedPrecondition, match="hybrid"):
                    await mgr.create(req)
                _nothing_made(cenv, mgr)
                return
            cid = await mgr.create(req)
            assert mgr.store.get(cid).runtime_handler == "crun"
            await mgr.start_container(cid)
            await await_until(lambda: mgr.store.get(cid).state is ContainerState.EXITED, "exit")
            assert mgr.store.get(cid).exit_code == 4
            await mgr.remove(cid)

    run(scenario())
    if reason is not None:
        pytest.skip(f"crun lifecycle not exercised on this host: {reason}")
