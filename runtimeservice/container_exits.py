"""Recording how a container ended.

Exits come from conmon's exit files only (exitwatch.py): `record_exit` reads
the file (and conmon's `oom` marker, and the memory cgroup's `oom_kill`
counter as a second witness) and moves the record to EXITED with the CRI
reason. It is idempotent and serialised by the record's lock, so the watcher,
a stop that is waiting, start-up recovery and the monitor watch below may all
call it.

`MonitorWatch` notices that a container's conmon is gone, with a pidfd per
monitor (no polling). A conmon that exits normally has written the exit file
first, so `record_exit` finds it; one that was killed has not: then the
container (which conmon no longer holds) is killed and recorded EXITED with
code 255, reason `ContainerStatusUnknown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from cri.errors import CribError
from runtimeservice.container import ContainerRecord, ContainerState, exit_reason
from runtimeservice.exitwatch import ExitInfo, lost_monitor_exit
from runtimeservice.monitor import monitor_alive

if TYPE_CHECKING:
    from runtimeservice.containers import ContainerManager

log = logging.getLogger(__name__)

ORPHAN_KILL_WAIT = 10.0  # s for a monitor-less container to die after SIGKILL


class MonitorWatch:
    """Calls `on_gone(container_id)` once when that container's conmon exits."""

    def __init__(self, on_gone: Callable[[str], None]) -> None:
        self.on_gone = on_gone
        self._fds: dict[str, int] = {}

    def watch(self, container_id: str, conmon_pid: int) -> None:
        self.unwatch(container_id)
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(conmon_pid)
        except OSError:  # already gone (ESRCH), or no pidfd support
            loop.call_soon(self.on_gone, container_id)
            return
        self._fds[container_id] = fd
        loop.add_reader(fd, self._fired, container_id)
        if not monitor_alive(conmon_pid, container_id):  # a reused pid, or a zombie
            self._fired(container_id)

    def _fired(self, container_id: str) -> None:
        if self.unwatch(container_id):
            self.on_gone(container_id)

    def unwatch(self, container_id: str) -> bool:
        fd = self._fds.pop(container_id, None)
        if fd is None:
            return False
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        return True

    def close(self) -> None:
        for cid in list(self._fds):
            self.unwatch(cid)

    def __len__(self) -> int:
        return len(self._fds)


async def _oom_witnessed(mgr: ContainerManager, rec: ContainerRecord, info: ExitInfo) -> bool:
    if info.oom_killed:
        return True
    if info.exit_code == 0:
        return False
    try:
        return await mgr.cgroups.oom_kill_count(rec.cgroup) > 0
    except (OSError, CribError):
        return False


async def kill_orphan(mgr: ContainerManager, rec: ContainerRecord) -> None:
    """SIGKILL a container whose monitor is gone and wait (bounded) for it to die."""
    runtime = mgr.runtime(rec.runtime_handler)
    try:
        await runtime.kill(rec.id, signal.SIGKILL, all=True)
    except CribError as exc:
        log.warning("container %s: cannot kill it after losing its monitor: %s",
                    rec.id[:12], exc.message)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ORPHAN_KILL_WAIT
    while loop.time() < deadline:
        pids = await mgr.cgroups.pids(rec.cgroup)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
    log.error("container %s: processes still alive after SIGKILL", rec.id[:12])


async def record_exit(mgr: ContainerManager, container_id: str,
                      monitor_gone: bool = False) -> ContainerRecord | None:
    """Record the container's exit if conmon wrote it (or, with `monitor_gone`, if
    conmon died without writing it). Returns the EXITED record, or None when the
    container is unknown, not live, or still running."""
    rec = mgr.store.find(container_id)
    if rec is None or not rec.live:
        return None
    async with mgr.store.lock(container_id):
        rec = mgr.store.find(container_id)
        if rec is None or not rec.live:
            return None
        info = await asyncio.to_thread(mgr.monitor.read_exit, rec.id, rec.persist_dir)
        if info is not None:
            oom = await _oom_witnessed(mgr, rec, info)
            finished = max(info.finished_at_ns, rec.started_at)  # the file's mtime is coarse
            changes = {"exit_code": info.exit_code, "finished_at": finished,
                       "reason": exit_reason(info.exit_code, oom), "message": ""}
        elif monitor_gone and not monitor_alive(rec.conmon_pid, rec.id):
            log.warning("container %s: its monitor (conmon %d) is gone without an exit code; "
                        "killing the container", rec.id[:12], rec.conmon_pid)
            await kill_orphan(mgr, rec)
            lost = lost_monitor_exit(rec.id, rec.conmon_pid)
            changes = {"exit_code": lost.exit_code, "finished_at": lost.finished_at_ns,
                       "reason": lost.reason, "message": lost.message}
        else:
            return None
        rec = await asyncio.to_thread(mgr.store.update, rec.id, state=ContainerState.EXITED,
                                      **changes)
    log.info("container %s exited: code %d (%s)", rec.id[:12], rec.exit_code, rec.reason)
    mgr.exited(rec)
    return rec
