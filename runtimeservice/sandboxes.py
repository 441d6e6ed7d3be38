"""Pod sandboxes: the manager behind the six sandbox RPCs.

A sandbox is a set of pinned namespaces, a pod cgroup, its /etc files and
/dev/shm, a CNI attachment and, only when the pod shares one PID namespace, an
infra process. The steps live in their own modules:

  sandbox_plan      validate the whole request first (InvalidArgument, nothing made)
  sandbox_run       create, each step with its undo
  sandbox_stop      stop and remove
  sandbox_status    records as CRI messages, list filters
  sandbox_update    UpdatePodSandboxResources on the pod cgroup
  sandbox_recover   what a start finds on disk
  sandbox_resources the idempotent makers and removers all of them share

Locking: each sandbox has its own lock (the record store's); RunPodSandbox
holds it while creating, so a Stop or Remove of an id that is still being
created waits for the result. Status and List read the in-memory records
without locks.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from api import api_pb2
from cri.config import Config
from cri.errors import InvalidArgument, NotFound
from runtimeservice import cgroups
from runtimeservice.cgroups import CgroupDriver, CgroupLayout, CgroupManager, CgroupMode
from runtimeservice.filters import ids_matching
from runtimeservice.names import Reservations, fingerprint
from runtimeservice.netready import pod_network
from runtimeservice.oci import OciRuntime
from runtimeservice.sandbox import SandboxRecord, reservation_name
from runtimeservice.sandbox_plan import plan
from runtimeservice.sandbox_recover import recover
from runtimeservice.sandbox_resources import ContainerHooks, NoContainers, SandboxResources
from runtimeservice.sandbox_run import create_sandbox
from runtimeservice.sandbox_status import matches, to_pod_sandbox, to_status, visible
from runtimeservice.sandbox_stop import remove_sandbox, stop_sandbox
from runtimeservice.sandbox_update import update_sandbox_resources
from runtimeservice.store import RecordStore

log = logging.getLogger(__name__)

STREAM_BATCH = 256


class SandboxManager:
    def __init__(self, cfg: Config, runtimes: Callable[[str], OciRuntime]) -> None:
        """`runtimes`: the OciRuntime of a handler name ('' = the default)."""
        self.cfg = cfg
        self.runtimes = runtimes
        self.store: RecordStore[SandboxRecord] = RecordStore(
            Path(cfg.root) / "sandboxes", SandboxRecord, "pod sandbox")
        self.reservations = Reservations("pod sandbox")
        self.network = pod_network(cfg)
        # The container layer replaces these with its own (stop/remove a pod's containers).
        self.container_hooks: ContainerHooks = NoContainers()
        self._res: SandboxResources | None = None

    @property
    def res(self) -> SandboxResources:
        if self._res is None:
            raise RuntimeError("SandboxManager.start() has not run")
        return self._res

    @property
    def cgroup_layout(self) -> CgroupLayout:
        return self.res.cgroups.layout

    async def start(self) -> None:
        """Detect the cgroup layout, then recover the sandboxes on disk."""
        layout = await asyncio.to_thread(cgroups.detect)
        driver = CgroupDriver(self.cfg.runtime.cgroup_driver)
        log.info("cgroup layout %s, driver %s", layout.mode.value, driver.value)
        self._res = SandboxResources(self.cfg, CgroupManager(layout, driver), self.network,
                                     self.runtimes)
        await recover(self.store, self.res, self.reservations)

    # -- lookups

    def get(self, sandbox_id: str) -> SandboxRecord:
        """A visible sandbox by id or unique id prefix; NotFound otherwise."""
        rec = self.store.resolve(sandbox_id)
        if not visible(rec):
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return rec

    def _find(self, sandbox_id: str) -> SandboxRecord | None:
        """For Stop/Remove: the sandbox (even one being created), None when unknown."""
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id must not be empty")
        rec = self.store.find(sandbox_id)
        if rec is not None:
            return rec
        found = ids_matching(sandbox_id, (r.id for r in self.store.all()))
        if len(found) > 1:
            raise InvalidArgument(f"pod sandbox id prefix {sandbox_id!r} is ambiguous")
        return self.store.find(found[0]) if found else None

    # -- RPCs

    async def run(self, req: api_pb2.RunPodSandboxRequest) -> str:
        checked = plan(req, self.cfg, cgroup_v2=self.cgroup_layout.mode is CgroupMode.UNIFIED)
        name = reservation_name(req.config.metadata)
        fp = fingerprint(req)
        return await self.reservations.create_once(
            name, fp, lambda: create_sandbox(self.store, self.res, checked, req, fp))

    async def stop(self, sandbox_id: str) -> None:
        rec = self._find(sandbox_id)
        if rec is None:
            log.info("StopPodSandbox: %s is unknown; nothing to do", sandbox_id)
            return
        async with self.store.lock(rec.id):
            current = self.store.find(rec.id)
            if current is not None:
                await stop_sandbox(self.store, self.res, self.container_hooks, current)

    async def remove(self, sandbox_id: str) -> None:
        rec = self._find(sandbox_id)
        if rec is None:
            log.info("RemovePodSandbox: %s is unknown; nothing to do", sandbox_id)
            return
        async with self.store.lock(rec.id):
            current = self.store.find(rec.id)
            if current is not None:
                await remove_sandbox(self.store, self.res, self.container_hooks,
                                     self.reservations, current)

    async def update_resources(self, req: api_pb2.UpdatePodSandboxResourcesRequest) -> None:
        """New pod-level limits on a ready sandbox's cgroup; NotFound, FailedPrecondition."""
        if not req.pod_sandbox_id:
            raise InvalidArgument("pod_sandbox_id must not be empty")
        rec = self.get(req.pod_sandbox_id)
        async with self.store.lock(rec.id):
            current = self.store.find(rec.id)
            if current is None or not visible(current):
                raise NotFound(f"pod sandbox {req.pod_sandbox_id!r} not found")
            await update_sandbox_resources(self.store, self.res, current, req)

    def status(self, sandbox_id: str, verbose: bool = False) -> api_pb2.PodSandboxStatusResponse:
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id must not be empty")
        return to_status(self.get(sandbox_id), verbose)

    def list(self, flt: api_pb2.PodSandboxFilter | None = None) -> list[api_pb2.PodSandbox]:
        found = (r for r in self.store.all() if matches(r, flt))
        return [to_pod_sandbox(r) for r in sorted(found, key=lambda r: r.created_at)]

    def batches(self, flt: api_pb2.PodSandboxFilter | None = None
                ) -> Iterator[builtins.list[api_pb2.PodSandbox]]:
        """The same list as `list`, in chunks for StreamPodSandboxes."""
        items = self.list(flt)
        for i in range(0, len(items), STREAM_BATCH):
            yield items[i:i + STREAM_BATCH]
