"""A daemon restart, as the ContainerManager sees it: a new manager on the same
directories. Running containers are still running and usable; exits that
happened meanwhile are recorded; a lost monitor is noticed; a CreateContainer
cut short by SIGKILL leaves nothing once the next manager has started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtimeservice.container import ContainerState
from runtimeservice.exitwatch import REASON_MONITOR_LOST
from tests.integration.containerenv import (
    ContainerEnv,
    await_until,
    busybox_rootfs,
    cenv,
    run,
    slow_conmon,
    wait_until,
)

pytestmark = pytest.mark.integration
__all__ = ["busybox_rootfs", "cenv"]

ROOT = Path(__file__).resolve().parents[2]


def test_restart_keeps_running_and_records_exits_from_the_downtime(cenv: ContainerEnv) -> None:
    async def first() -> tuple[str, str, str]:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            ids = []
            for name in ("keeps", "dies", "orphan"):
                cid = await mgr.create(cenv.request(pod, cenv.config(name, ["sleep", "1000"])))
                await mgr.start_container(cid)
                ids.append(cid)
            return ids[0], ids[1], ids[2]

    keeps, dies, orphan = run(first())
    runc = cenv.runtimes["runc"]
    # While no manager runs: one container is killed (conmon records it), and
    # the monitor of another is killed (nothing records anything).
    subprocess.run([runc.path, "--root", runc.root, "kill", dies, "KILL"], check=True)
    orphan_conmon = int(json.loads(
        (Path(cenv.cfg.root) / "containers" / "records" / f"{orphan}.json").read_text())
        ["conmon_pid"])
    os.kill(orphan_conmon, signal.SIGKILL)
    wait_until(lambda: (Path(cenv.cfg.runroot) / "exits" / dies).exists(), "the exit file")

    async def second() -> None:
        async with cenv.started() as mgr:
            assert {c.id for c in mgr.list()} == {keeps, dies, orphan}
            assert mgr.store.get(keeps).state is ContainerState.RUNNING
            st = (await mgr.status(dies)).status
            assert (st.exit_code, st.reason) == (137, "Error")
            lost = mgr.store.get(orphan)
            assert (lost.state, lost.exit_code, lost.reason) == (
                ContainerState.EXITED, 255, REASON_MONITOR_LOST)
            res = await mgr.exec_sync(keeps, ["echo", "still here"], 10)
            assert res.stdout == b"still here\n"
            # a later exit is recorded by this manager
            subprocess.run([runc.path, "--root", runc.root, "kill", keeps, "KILL"], check=True)
            await await_until(lambda: mgr.store.get(keeps).state is ContainerState.EXITED,
                              "the later exit")
            assert mgr.store.get(keeps).exit_code == 137
            for cid in (keeps, dies, orphan):
                await mgr.remove(cid)

    run(second())
    assert cenv.leftovers() == []


CHILD = """
import asyncio, sys
from pathlib import Path
from api import api_pb2
from tests.integration.containerenv import ContainerEnv
base, layer, token, conmon, req = sys.argv[1:6]
env = ContainerEnv(Path(base), Path(layer), token=token)
env.cfg.runtime.conmon = conmon
env.sandboxes.load()
async def main():
    mgr = env.manager()
    await mgr.start()
    await mgr.create(api_pb2.CreateContainerRequest.FromString(bytes.fromhex(req)))
asyncio.run(main())
"""

WRAPPER_DELAY = 3.0


def test_sigkill_during_create_leaves_nothing_after_restart(cenv: ContainerEnv) -> None:
    pod = run(cenv.sandbox())
    req = cenv.request(pod, cenv.config("victim", ["sleep", "1000"]))
    wrapper = slow_conmon(cenv.base / "slow-conmon", WRAPPER_DELAY)
    records = Path(cenv.cfg.root) / "containers" / "records"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(cenv.base), str(cenv.layer),
         cenv.token, str(wrapper), req.SerializeToString().hex()],
        cwd=ROOT, start_new_session=True)
    try:
        def creating() -> bool:
            found = list(records.glob("*.json")) if records.is_dir() else []
            wrapper_runs = any("slow-conmon --api-version" in c for _, c in cenv.processes())
            return bool(found) and json.loads(found[0].read_text())["state"] == "creating" \
                and bool(cenv.mounts()) and wrapper_runs

        wait_until(creating, "CreateContainer to reach conmon")
    finally:
        child.kill()
        child.wait()
    killed_at = time.monotonic()
    assert cenv.mounts() and cenv.processes()  # the crash left a mount and a monitor

    async def restart() -> None:
        async with cenv.started() as mgr:
            assert mgr.list() == [] and mgr.store.all() == []

    run(restart())
    # Past the point where the slow conmon would have created the container.
    time.sleep(max(0.0, WRAPPER_DELAY + 1.0 - (time.monotonic() - killed_at)))
    assert cenv.leftovers() == []
    assert not list(records.glob("*.json"))
