"""StopContainer, RemoveContainer, and tearing down what a container owns.

Stop: the stop signal (the CRI's, else the image's, else SIGTERM) to the
container's init; after `timeout` seconds (at once for 0) SIGKILL to every
process of the container; then wait until conmon's exit file has been
recorded. A container whose monitor is gone is killed and recorded at once
(container_exits.py). Stop of a missing, creating or exited container succeeds.

Remove: stop with timeout 0 when still live → `destroy` (monitor, runtime
state, leftover cgroup) → rootfs unmounted and its writable layer deleted →
directories → record → name. Remove of a missing container succeeds.

`destroy` and `remove_files` are idempotent: start-up recovery uses them to
unwind a CreateContainer that a crash interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING

from cri.errors import CribError, DeadlineExceeded, FailedPrecondition, NotFound
from runtimeservice import rootfs
from runtimeservice.container import ContainerRecord
from runtimeservice.container_create import remove_dirs
from runtimeservice.container_exits import record_exit
from runtimeservice.monitor import monitor_alive

if TYPE_CHECKING:
    from runtimeservice.containers import ContainerManager

log = logging.getLogger(__name__)

KILL_WAIT = 30.0  # s for an exit to be recorded after SIGKILL
POLL = 1.0  # s between direct looks at the exit file while waiting


async def wait_exited(mgr: ContainerManager, container_id: str, timeout: float) -> bool:
    """Wait until the container's exit is recorded; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    event = mgr.exit_event(container_id)
    while True:
        rec = mgr.store.find(container_id)
        if rec is None or not rec.live:
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(left, POLL))
            continue
        # The watcher is the normal path; this look at the file only guards a lost event.
        await record_exit(mgr, container_id)


async def stop(mgr: ContainerManager, rec: ContainerRecord, timeout: float) -> None:
    if not rec.live:
        return
    runtime = mgr.runtime(rec.runtime_handler)
    if not monitor_alive(rec.conmon_pid, rec.id) and \
            await record_exit(mgr, rec.id, monitor_gone=True) is not None:
        return
    if timeout > 0:
        log.info("container %s: stopping with %s (grace %gs)", rec.id[:12],
                 rec.stop_signal_name, timeout)
        try:
            signalled = await runtime.kill(rec.id, rec.stop_signal)
        except NotFound:
            signalled = False
        if await wait_exited(mgr, rec.id, timeout if signalled else POLL):
            return
    log.info("container %s: killing", rec.id[:12])
    with contextlib.suppress(NotFound):
        await runtime.kill(rec.id, signal.SIGKILL, all=True)
    if not await wait_exited(mgr, rec.id, KILL_WAIT) and \
            await record_exit(mgr, rec.id, monitor_gone=True) is None:
        raise DeadlineExceeded(
            f"container {rec.id} did not exit within {KILL_WAIT:g}s of SIGKILL")


async def destroy(mgr: ContainerManager, rec: ContainerRecord) -> None:
    """Kill the monitor if it lives, delete the runtime's state (killing what is
    left), drop conmon's files, and empty and remove the container's cgroup."""
    mgr.monitor_watch.unwatch(rec.id)
    for pid in _monitor_pids(rec):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    runtime = mgr.runtime(rec.runtime_handler)
    try:
        await runtime.delete(rec.id, force=True)
    except CribError as exc:
        log.warning("container %s: runtime delete failed: %s", rec.id[:12], exc.message)
    await mgr.monitor.cleanup(rec.id, rec.bundle, rec.persist_dir)
    mgr.exit_watcher_forget(rec.id)
    for _ in range(100):
        pids = await mgr.cgroups.pids(rec.cgroup)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.02)
    try:
        await mgr.cgroups.remove(rec.cgroup)
    except FailedPrecondition as exc:
        log.error("container %s: cgroup left behind: %s", rec.id[:12], exc.message)


def _monitor_pids(rec: ContainerRecord) -> list[int]:
    """The container's live conmon; for a container whose create never finished,
    every process naming it in its arguments (a conmon or runtime that a crash
    left before its pid was recorded)."""
    if rec.conmon_pid:
        return [rec.conmon_pid] if monitor_alive(rec.conmon_pid, rec.id) else []
    return processes_naming(rec.id)


def processes_naming(container_id: str) -> list[int]:
    """Pids whose argv contains `container_id` as a whole argument."""
    needle = container_id.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if needle in args:
            found.append(int(entry))
    return found


async def remove_files(rec: ContainerRecord) -> None:
    """Unmount the rootfs, delete the writable layer and the container's directories."""
    await rootfs.remove(rec.paths)
    await asyncio.to_thread(remove_dirs, rec)


async def remove(mgr: ContainerManager, rec: ContainerRecord) -> None:
    if rec.live:
        await stop(mgr, rec, 0)
    async with mgr.store.lock(rec.id):
        current = mgr.store.find(rec.id)
        if current is None:
            return
        await destroy(mgr, current)
        await remove_files(current)
        await asyncio.to_thread(mgr.store.delete, current.id)
        mgr.reservations.release(current.name, current.id)
    log.info("container %s removed", rec.id[:12])
    mgr.removed(current)
    await mgr.monitor.release_cgroup()
