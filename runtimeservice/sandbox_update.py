"""UpdatePodSandboxResources: new pod-level limits applied to the pod cgroup live.

The kubelet sends the pod's resources (the sum of its containers') and the
runtime class overhead after an in-place resize. The pod cgroup gets the same
limits RunPodSandbox would have given it (`sandbox_plan.pod_resources`: the
resources plus the overhead, a limit the pod does not set stays unset), and
the record keeps the new messages so a later update, a status and a restart
all see them.

A field the request leaves out keeps its recorded value; inside a message, a
0 leaves that limit as it is and -1 lifts it, as at creation. The caller holds
the sandbox's lock. Only a READY sandbox can be updated: a stopped one has no
workload left to resize (FailedPrecondition).

When the kernel refuses one value (a memory limit below the current usage is
EBUSY: FailedPrecondition), the values written before it stay applied and the
record keeps the old messages; the kubelet retries the whole update.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from api import api_pb2
from cri.errors import FailedPrecondition
from runtimeservice.cgroups import CgroupResources
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.sandbox_plan import check_pod_resources, pod_resources
from runtimeservice.sandbox_resources import SandboxResources
from runtimeservice.store import RecordStore

log = logging.getLogger(__name__)

Resources = api_pb2.LinuxContainerResources


def updated_resources(rec: SandboxRecord, req: api_pb2.UpdatePodSandboxResourcesRequest
                      ) -> tuple[Resources | None, Resources | None]:
    """(resources, overhead) after the update: the request's where it sets them (pure)."""
    current_res, current_over = rec.pod_resources()
    res = req.resources if req.HasField("resources") else current_res
    over = req.overhead if req.HasField("overhead") else current_over
    return res, over


def record_changes(req: api_pb2.UpdatePodSandboxResourcesRequest) -> dict[str, Any]:
    """The record fields the update sets: the serialised messages the request carries (pure)."""
    changes: dict[str, Any] = {}
    for name in ("resources", "overhead"):
        if req.HasField(name):
            changes[name] = getattr(req, name).SerializeToString(deterministic=True)
    return changes


def cgroup_limits(rec: SandboxRecord, req: api_pb2.UpdatePodSandboxResourcesRequest,
                  cgroup_v2: bool) -> CgroupResources | None:
    """The pod cgroup's new limits (None: nothing to write); InvalidArgument when invalid."""
    res, over = updated_resources(rec, req)
    limits = pod_resources(res, over)
    check_pod_resources(limits, cgroup_v2)
    return limits


async def update_sandbox_resources(store: RecordStore[SandboxRecord], res: SandboxResources,
                                   rec: SandboxRecord,
                                   req: api_pb2.UpdatePodSandboxResourcesRequest
                                   ) -> SandboxRecord:
    """Apply the request to `rec`'s pod cgroup and record it; the updated record."""
    if rec.state is not SandboxState.READY:
        raise FailedPrecondition(
            f"pod sandbox {rec.id} is {rec.state.value}: only a ready sandbox can be resized")
    limits = cgroup_limits(rec, req, res.cgroups.layout.is_v2)
    changes = record_changes(req)
    if not changes:
        log.info("UpdatePodSandboxResources %s: neither resources nor overhead given; "
                 "nothing to do", rec.id[:12])
        return rec
    if limits is not None:
        await res.cgroups.update(rec.cgroup, limits)
    rec = await asyncio.to_thread(store.update, rec.id, **changes)
    log.info("sandbox %s resources updated: %s", rec.id[:12], limits)
    return rec
