"""UpdateContainerResources: new limits applied live with `<runtime> update`.

The request's non-zero fields replace the container's current ones (a zero
field keeps what the container has, as `runc update` keeps an absent key);
the merged resources are what ContainerStatus reports afterwards. OOM score
changes are not applied to a running process (runc cannot), as in CRI-O.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from runtimeservice.containers import ContainerManager

log = logging.getLogger(__name__)


def oci_resources(res: api_pb2.LinuxContainerResources, *, cgroup_v2: bool,
                  swap_supported: bool = True, hugetlb_supported: bool = True
                  ) -> dict[str, Any]:
    """OCI `linux.resources` with just the fields `res` sets."""
    for name in ("cpu_period", "cpu_shares", "memory_limit_in_bytes", "cpu_quota"):
        value = getattr(res, name)
        if value < -1 or (value < 0 and name != "cpu_quota"):
            raise InvalidArgument(f"resources {name} {value} is negative")
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    for field, key in (("cpu_shares", "shares"), ("cpu_quota", "quota"),
                       ("cpu_period", "period"), ("cpuset_cpus", "cpus"),
                       ("cpuset_mems", "mems")):
        value = getattr(res, field)
        if value:
            cpu[key] = value
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    if res.memory_limit_in_bytes:
        memory["limit"] = res.memory_limit_in_bytes
    swap = res.memory_swap_limit_in_bytes
    if swap:
        limit = res.memory_limit_in_bytes
        if swap != -1 and (swap < 0 or (limit and swap < limit)):
            raise InvalidArgument(f"memory_swap_limit_in_bytes {swap} is below "
                                  f"memory_limit_in_bytes {limit}")
        if swap_supported:
            memory["swap"] = swap
    if memory:
        out["memory"] = memory
    if res.hugepage_limits and hugetlb_supported:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        if not cgroup_v2:
            keys = ", ".join(sorted(res.unified))
            raise InvalidArgument(f"unified cgroup keys ({keys}) need a cgroup v2 host")
        out["unified"] = dict(res.unified)
    return out


def merged(current: api_pb2.LinuxContainerResources | None,
           update: api_pb2.LinuxContainerResources) -> api_pb2.LinuxContainerResources:
    out = api_pb2.LinuxContainerResources()
    if current is not None:
        out.CopyFrom(current)
    out.MergeFrom(update)  # set scalars replace, maps merge
    if update.hugepage_limits:
        del out.hugepage_limits[:]
        out.hugepage_limits.extend(update.hugepage_limits)
    return out


async def update_resources(mgr: ContainerManager, container_id: str,
                           res: api_pb2.LinuxContainerResources) -> None:
    rec = mgr.get(container_id)
    async with mgr.store.lock(rec.id):
        rec = mgr.get(rec.id)
        if not rec.live:
            raise FailedPrecondition(
                f"container {rec.id} is {rec.state.value}: its resources cannot be updated")
        host = await mgr.host_facts(mgr.runtime(rec.runtime_handler))
        body = oci_resources(res, cgroup_v2=host.cgroup_v2, swap_supported=host.swap_supported,
                             hugetlb_supported=host.hugetlb_supported)
        if body:
            await mgr.runtime(rec.runtime_handler).update(rec.id, body)
        new = merged(rec.cri_resources(), res)
        await asyncio.to_thread(mgr.store.update, rec.id,
                                resources=new.SerializeToString(deterministic=True))
    log.info("container %s: resources updated (%s)", rec.id[:12], ", ".join(sorted(body)) or "-")
