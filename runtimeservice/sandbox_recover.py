"""Sandboxes after a daemon start: finish what a crash interrupted, notice what a reboot lost.

Runs before the daemon accepts calls. For each record on disk:

- CREATING: the daemon died inside RunPodSandbox. Every resource the sandbox
  may own is removed (CNI DEL included, from the cached attachment) and the
  record deleted: the sandbox is absent, as if the call had failed.
- READY whose namespaces are gone (the node rebooted: the runroot is a tmpfs)
  or whose infra process died: NOTREADY, as the kubelet must recreate it.
  With the network namespace gone, CNI DEL runs with an empty netns so the
  IPAM store (on disk, it survived) and host rules release the pod's IPs.
- every kept sandbox: its name re-reserved with the original request's
  fingerprint, so a retried RunPodSandbox still gets its id.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from runtimeservice import namespaces
from runtimeservice.names import Reservations
from runtimeservice.sandbox import SandboxRecord, SandboxState, reservation_name
from runtimeservice.sandbox_infra import alive
from runtimeservice.sandbox_resources import SandboxResources
from runtimeservice.store import RecordStore

log = logging.getLogger(__name__)
_PARALLEL = 8


def recovery_changes(rec: SandboxRecord, netns_alive: bool, infra_alive: bool
                     ) -> tuple[dict[str, Any], bool]:
    """(record changes, whether to run CNI DEL) for a READY or NOTREADY sandbox."""
    changes: dict[str, Any] = {}
    detach = False
    if rec.infra_pid and not infra_alive:
        changes.update(infra_pid=0, infra_start=0, pidns="")
    if rec.netns and not netns_alive and rec.network_attached:
        detach = True
    if rec.state is SandboxState.READY and (changes or (rec.netns and not netns_alive)):
        changes["state"] = SandboxState.NOTREADY
    return changes, detach


async def _recover_one(store: RecordStore[SandboxRecord], res: SandboxResources,
                       reservations: Reservations, rec: SandboxRecord) -> None:
    if rec.state is SandboxState.CREATING:
        log.info("sandbox %s was being created when crib stopped: removing it", rec.id[:12])
        try:
            await res.teardown(rec, network=bool(rec.netns))
        except Exception as exc:
            log.error("sandbox %s: cleanup failed, retried at the next start: %s",
                      rec.id[:12], exc)
            return
        await asyncio.to_thread(store.delete, rec.id)
        return
    reservations.restore(reservation_name(rec.metadata), rec.id, rec.fingerprint)
    netns_alive = not rec.netns or namespaces.is_pinned(Path(rec.netns))
    changes, detach = recovery_changes(rec, netns_alive, alive(rec.infra_pid, rec.infra_start))
    if detach:
        try:
            await res.detach_network(rec)
            changes.update(network_attached=False, ips=())
        except Exception as exc:
            log.error("sandbox %s: CNI DEL after losing its netns failed: %s", rec.id[:12], exc)
    if changes:
        log.info("sandbox %s recovered with changes %s", rec.id[:12], sorted(changes))
        await asyncio.to_thread(store.update, rec.id, **changes)


async def recover(store: RecordStore[SandboxRecord], res: SandboxResources,
                  reservations: Reservations) -> None:
    records = await asyncio.to_thread(store.load)
    limit = asyncio.Semaphore(_PARALLEL)

    async def one(rec: SandboxRecord) -> None:
        async with limit:
            await _recover_one(store, res, reservations, rec)

    await asyncio.gather(*(one(r) for r in records))
    kept = len(store)
    if records:
        log.info("recovered %d sandbox(es), %d removed", kept, len(records) - kept)
