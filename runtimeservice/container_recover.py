"""Containers after a daemon start: finish what a crash interrupted, record
the exits that happened while the daemon was down.

Runs before the daemon accepts calls (after the sandboxes recovered). For each
record on disk:

- CREATING: the daemon died inside CreateContainer. Whatever the container
  may own is removed — a conmon or runtime process still naming it, the
  runtime's state, the container's cgroup (and anything left in it), the
  rootfs mount and its writable layer, the directories — and the record
  deleted: the container is absent, as if the call had failed.
- CREATED or RUNNING: conmon's exit file, if there is one, is recorded (the
  container exited meanwhile); a container whose conmon is gone without one
  is killed and recorded as exited with code 255 (the node rebooted, or the
  monitor was killed); otherwise its monitor is watched again.
- every kept container: its name re-reserved with the original request's
  fingerprint, so a retried CreateContainer still gets its id.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from runtimeservice.container import ContainerRecord, ContainerState
from runtimeservice.container_exits import record_exit
from runtimeservice.container_stop import destroy, remove_files
from runtimeservice.monitor import monitor_alive

if TYPE_CHECKING:
    from runtimeservice.containers import ContainerManager

log = logging.getLogger(__name__)
_PARALLEL = 8


async def unwind(mgr: ContainerManager, rec: ContainerRecord) -> bool:
    """Remove everything a half-created container may own; True when all went."""
    log.info("container %s was being created when crib stopped: removing it", rec.id[:12])
    try:
        await destroy(mgr, rec)
        await remove_files(rec)
    except Exception as exc:
        log.error("container %s: cleanup failed, retried at the next start: %s",
                  rec.id[:12], exc)
        return False
    await asyncio.to_thread(mgr.store.delete, rec.id)
    return True


async def _recover_one(mgr: ContainerManager, rec: ContainerRecord) -> None:
    if rec.state is ContainerState.CREATING:
        await unwind(mgr, rec)
        return
    mgr.reservations.restore(rec.name, rec.id, rec.fingerprint)
    if not rec.live:
        return
    if await record_exit(mgr, rec.id) is not None:
        return
    if monitor_alive(rec.conmon_pid, rec.id):
        mgr.monitor_watch.watch(rec.id, rec.conmon_pid)
        return
    await record_exit(mgr, rec.id, monitor_gone=True)


async def recover(mgr: ContainerManager) -> None:
    records = await asyncio.to_thread(mgr.store.load)
    limit = asyncio.Semaphore(_PARALLEL)

    async def one(rec: ContainerRecord) -> None:
        async with limit:
            await _recover_one(mgr, rec)

    await asyncio.gather(*(one(r) for r in records))
    await mgr.monitor.release_cgroup()  # empty once the last monitor went
    states: dict[str, int] = {}
    for r in mgr.store.all():
        states[r.state.value] = states.get(r.state.value, 0) + 1
    if records:
        log.info("recovered %d container(s) %s, %d removed", len(mgr.store), states,
                 len(records) - len(mgr.store))
