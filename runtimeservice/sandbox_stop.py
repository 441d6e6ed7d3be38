"""StopPodSandbox and RemovePodSandbox on a sandbox that exists (callers hold its lock).

Stop: the pod's containers stopped (the container layer's hook) → the infra
process killed → CNI DEL (retried, while the netns is still pinned) → NOTREADY
with no IPs: the addresses are back in the IPAM pool, so reporting them would
be wrong (containerd also reports none once the network is torn down).
Namespaces, files and the cgroup stay until Remove. Stopping again is a no-op.

Remove: Stop if needed → the containers removed (hook) → every resource
removed (sandbox_resources.teardown) → the record deleted → the name released.
A step that fails keeps the record, so the kubelet's retry finishes the job.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cri import metrics
from runtimeservice.failure_steps import CNI
from runtimeservice.names import Reservations
from runtimeservice.sandbox import SandboxRecord, SandboxState, reservation_name
from runtimeservice.sandbox_resources import ContainerHooks, SandboxResources, shares_pid
from runtimeservice.store import RecordStore

log = logging.getLogger(__name__)

# The kubelet stops containers with their grace period before StopPodSandbox;
# whatever still runs then is killed at once, as the CRI asks.
STOP_TIMEOUT = 0.0


async def stop_sandbox(store: RecordStore[SandboxRecord], res: SandboxResources,
                       hooks: ContainerHooks, rec: SandboxRecord) -> SandboxRecord:
    await hooks.stop_all(rec.id, STOP_TIMEOUT)
    changes: dict[str, Any] = {}
    if rec.infra_pid or shares_pid(rec):
        await res.stop_infra(rec)
        if rec.infra_pid:
            changes.update(infra_pid=0, infra_start=0, pidns="")
    if rec.network_attached:
        try:
            await res.detach_network(rec)
        except Exception:
            metrics.record_failure("StopPodSandbox", CNI)
            if rec.state is not SandboxState.NOTREADY or changes:
                await asyncio.to_thread(store.update, rec.id, state=SandboxState.NOTREADY,
                                        **changes)
            raise
        changes.update(network_attached=False, ips=())
    if rec.state is not SandboxState.NOTREADY or changes:
        rec = await asyncio.to_thread(store.update, rec.id, state=SandboxState.NOTREADY,
                                      **changes)
        log.info("sandbox %s stopped", rec.id[:12])
    return rec


async def remove_sandbox(store: RecordStore[SandboxRecord], res: SandboxResources,
                         hooks: ContainerHooks, reservations: Reservations,
                         rec: SandboxRecord) -> None:
    rec = await stop_sandbox(store, res, hooks, rec)
    await hooks.remove_all(rec.id)
    await res.teardown(rec, network=rec.network_attached)
    await asyncio.to_thread(store.delete, rec.id)
    reservations.release(reservation_name(rec.metadata), rec.id)
    log.info("sandbox %s removed", rec.id[:12])
