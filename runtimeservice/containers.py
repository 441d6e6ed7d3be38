"""Containers: the manager behind the container RPCs.

A container is a process that an OCI runtime (the sandbox's handler) starts
from a config.json joining the sandbox's namespaces, over an overlay rootfs
of its image, watched by its own conmon. The steps live in their own modules:

  container          the record, its states and the exit reasons
  container_create   CreateContainer, each step with its undo
  container_stop     Stop, Remove, and tearing down what a container owns
  container_exits    recording exits (conmon's files) and lost monitors
  container_update   UpdateContainerResources
  container_status   records as CRI messages, list filters
  container_stats    container and pod stats
  container_recover  what a start finds on disk
  container_images   the seam to the image store

Locking: each container has its own lock (the record store's). Start, the
exit recording, Update and the end of Remove hold it; Stop does not (it
waits for the exit, which needs the lock). Status and List read the
in-memory records without locks.

Events: each lifecycle change (created, started, exited, removed) is published
to the `EventHub` (events_rpcs.py) with the pod's status and the statuses of
all its containers, as the kubelet's evented PLEG expects; the exits found by
start-up recovery are published before `start()` returns and the hub replays
them to early subscribers.

Wiring (the daemon): `ContainerManager(cfg, sandboxes.store, images, handlers.
runtime, events=hub)`; `sandboxes.container_hooks = manager`; the image
service's `set_in_use(manager.image_in_use)` and
`set_container_filesystems(manager.container_filesystems)`; `await
manager.start()` after the sandboxes recovered; `await manager.close()` at
shutdown (containers keep running).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from api import api_pb2
from cri.config import Config
from cri.errors import FailedPrecondition, InvalidArgument, NotFound
from runtimeservice import cgroups as cgroupmod
from runtimeservice import container_create, container_stop, rootfs
from runtimeservice.cgroups import CgroupDriver, CgroupManager
from runtimeservice.container import ContainerRecord, ContainerState
from runtimeservice.container_exits import MonitorWatch, record_exit
from runtimeservice.container_images import ImageSource
from runtimeservice.container_recover import recover
from runtimeservice.container_stats import StatsCollector
from runtimeservice.container_status import (
    ContainerCache,
    matches,
    ordered,
    stats_matches,
    to_status,
    verbose_info,
)
from runtimeservice.container_update import update_resources
from runtimeservice.events_rpcs import EventHub
from runtimeservice.exec import ExecResult, exec_process, exec_sync, load_process
from runtimeservice.exitwatch import ExitWatcher
from runtimeservice.filters import labels_match
from runtimeservice.monitor import Monitor, MonitorConfig
from runtimeservice.names import Reservations
from runtimeservice.oci import OciRuntime
from runtimeservice.ocispec import HostFacts
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.sandbox_status import to_status as sandbox_status
from runtimeservice.store import RecordStore

log = logging.getLogger(__name__)

STREAM_BATCH = 256
DEFAULT_CONMON_CGROUP = "/crib-conmon"


class SandboxSource(Protocol):
    """The sandbox records (the SandboxManager's store)."""

    def find(self, ident: str) -> SandboxRecord | None: ...

    def resolve(self, prefix: str) -> SandboxRecord: ...

    def all(self) -> list[SandboxRecord]: ...


class ContainerManager:
    def __init__(self, cfg: Config, sandboxes: SandboxSource, images: ImageSource,
                 runtimes: Callable[[str], OciRuntime], *, cgroups: CgroupManager | None = None,
                 events: EventHub | None = None,
                 conmon_cgroup: str | None = DEFAULT_CONMON_CGROUP) -> None:
        self.cfg = cfg
        self.sandboxes = sandboxes
        self.images = images
        self._runtimes = runtimes
        self.events = events
        self.bundle_dir = Path(cfg.root) / "containers"
        self.run_dir = Path(cfg.runroot) / "containers"
        self.store: RecordStore[ContainerRecord] = RecordStore(
            self.bundle_dir / "records", ContainerRecord, "container")
        self.reservations = Reservations("container")
        self._cgroups = cgroups
        self.monitor_config = MonitorConfig(
            conmon_path=cfg.runtime.conmon, exit_dir=str(Path(cfg.runroot) / "exits"),
            socket_dir=str(Path(cfg.runroot) / "s"), conmon_cgroup=conmon_cgroup)
        self._monitor: Monitor | None = None
        self._host: HostFacts | None = None
        self._host_by_handler: dict[str, HostFacts] = {}
        self.creating: dict[str, set[asyncio.Task[Any]]] = {}  # sandbox id -> create tasks
        self.stopping: set[str] = set()  # sandboxes being (or already) stopped
        self._exit_events: dict[str, asyncio.Event] = {}
        self._processes: dict[str, dict[str, Any]] = {}  # exec's base process per container
        self.messages = ContainerCache()
        self.monitor_watch = MonitorWatch(self._monitor_gone)
        self._watcher: ExitWatcher | None = None
        self._stats: StatsCollector | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- life cycle

    @property
    def cgroups(self) -> CgroupManager:
        if self._cgroups is None:
            raise RuntimeError("ContainerManager.start() has not run")
        return self._cgroups

    @property
    def monitor(self) -> Monitor:
        if self._monitor is None:
            raise RuntimeError("ContainerManager.start() has not run")
        return self._monitor

    @property
    def stats_collector(self) -> StatsCollector:
        if self._stats is None:
            raise RuntimeError("ContainerManager.start() has not run")
        return self._stats

    async def start(self) -> None:
        """Probe the host, recover the containers on disk, then watch for exits."""
        if self._cgroups is None:
            layout = await asyncio.to_thread(cgroupmod.detect)
            self._cgroups = CgroupManager(layout, CgroupDriver(self.cfg.runtime.cgroup_driver))
        self._monitor = Monitor(self.monitor_config, self._cgroups)
        self._stats = StatsCollector(self._cgroups, str(self.bundle_dir))
        host = await asyncio.to_thread(HostFacts.probe)
        if not self.cfg.runtime.clamp_oom_score_adj:
            host = dataclasses.replace(host, oom_score_adj_min=None)
        self._host = host
        for d in (self.bundle_dir, self.run_dir):
            await asyncio.to_thread(d.mkdir, 0o700, True, True)
        await recover(self)
        if self.events is not None:
            self.events.recovered()
        self._watcher = ExitWatcher(self.monitor_config.exit_dir, self._exit_file)
        await self._watcher.start()

    async def close(self) -> None:
        """Stop watching (the containers and their monitors keep running)."""
        if self._watcher is not None:
            await self._watcher.close()
        self.monitor_watch.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def runtime(self, handler: str) -> OciRuntime:
        try:
            return self._runtimes(handler)
        except KeyError:
            raise FailedPrecondition(f"runtime handler {handler!r} is not configured") from None

    async def host_facts(self, runtime: OciRuntime) -> HostFacts:
        """What the host and this runtime support (the runtime decides `rro`)."""
        facts = self._host_by_handler.get(runtime.handler)
        if facts is None:
            base = self._host
            if base is None:
                base = self._host = await asyncio.to_thread(HostFacts.probe)
            features = await runtime.features()
            rro = bool(features and features.recursive_read_only and base.rro_supported)
            facts = self._host_by_handler[runtime.handler] = dataclasses.replace(
                base, rro_supported=rro)
        return facts

    # -- lookups

    def get(self, container_id: str) -> ContainerRecord:
        """A visible container by id or unique id prefix; NotFound otherwise."""
        if not container_id:
            raise InvalidArgument("container_id must not be empty")
        rec = self.store.resolve(container_id)
        if not rec.visible:
            raise NotFound(f"container {container_id!r} not found")
        return rec

    def _lookup(self, container_id: str) -> ContainerRecord | None:
        """For Stop/Remove: the visible container, None when unknown."""
        try:
            return self.get(container_id)
        except NotFound:
            return None

    # -- lifecycle RPCs

    async def create(self, req: api_pb2.CreateContainerRequest) -> str:
        return await container_create.create(self, req)

    async def start_container(self, container_id: str) -> None:
        rec = self.get(container_id)
        async with self.store.lock(rec.id):
            rec = self.get(rec.id)
            if rec.state is not ContainerState.CREATED:
                raise FailedPrecondition(
                    f"container {rec.id} is {rec.state.value}: only a created container "
                    "can be started")
            started = time.time_ns()  # before: a quick process may exit before start returns
            await self.runtime(rec.runtime_handler).start(rec.id)
            rec = await asyncio.to_thread(self.store.update, rec.id,
                                          state=ContainerState.RUNNING, started_at=started)
        log.info("container %s started", rec.id[:12])
        self._publish(api_pb2.ContainerEventType.CONTAINER_STARTED_EVENT, rec)

    async def stop(self, container_id: str, timeout: float) -> None:
        rec = self._lookup(container_id)
        if rec is None:
            log.info("StopContainer: %s is unknown; nothing to do", container_id)
            return
        await container_stop.stop(self, rec, max(0.0, timeout))

    async def remove(self, container_id: str) -> None:
        rec = self._lookup(container_id)
        if rec is None:
            log.info("RemoveContainer: %s is unknown; nothing to do", container_id)
            return
        await container_stop.remove(self, rec)

    async def destroy(self, rec: ContainerRecord) -> None:
        await container_stop.destroy(self, rec)

    # -- status

    async def status(self, container_id: str, verbose: bool = False
                     ) -> api_pb2.ContainerStatusResponse:
        rec = self.get(container_id)
        if not verbose:
            return api_pb2.ContainerStatusResponse(status=to_status(rec))
        spec = await asyncio.to_thread(_read_spec, Path(rec.bundle) / "config.json")
        return api_pb2.ContainerStatusResponse(status=to_status(rec),
                                               info=verbose_info(rec, spec))

    def list(self, flt: api_pb2.ContainerFilter | None = None) -> builtins.list[api_pb2.Container]:
        found = ordered(r for r in self.store.all() if matches(r, flt))
        return [self.messages.container(r) for r in found]

    def batches(self, flt: api_pb2.ContainerFilter | None = None
                ) -> Iterator[builtins.list[api_pb2.Container]]:
        items = self.list(flt)
        for i in range(0, len(items), STREAM_BATCH):
            yield items[i:i + STREAM_BATCH]

    # -- operations on a live container

    async def update_resources(self, container_id: str,
                               res: api_pb2.LinuxContainerResources) -> None:
        await update_resources(self, container_id, res)

    async def reopen_log(self, container_id: str) -> None:
        rec = self.get(container_id)
        if rec.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {rec.id} is {rec.state.value}: "
                                     "only a running container's log can be reopened")
        await self.monitor.reopen_log(rec.id, rec.monitor_log, rec.conmon_pid)

    async def exec_sync(self, container_id: str, cmd: Sequence[str],
                        timeout: float) -> ExecResult:
        rec = self.get(container_id)
        if rec.state is not ContainerState.RUNNING:
            raise FailedPrecondition(
                f"container {rec.id} is {rec.state.value}: cannot exec in it")
        base = self._processes.get(rec.id)
        if base is None:
            base = self._processes[rec.id] = await asyncio.to_thread(load_process, rec.bundle)
        return await exec_sync(
            self.runtime(rec.runtime_handler), rec.id, exec_process(base, list(cmd)),
            timeout=timeout or None, output_limit=self.cfg.runtime.exec_output_limit,
            work_dir=rec.persist_dir)

    # -- stats

    async def container_stats(self, container_id: str) -> api_pb2.ContainerStats:
        rec = self.get(container_id)
        return (await self.stats_collector.containers([rec]))[0]

    async def list_container_stats(self, flt: api_pb2.ContainerStatsFilter | None = None
                                   ) -> builtins.list[api_pb2.ContainerStats]:
        found = ordered(r for r in self.store.all() if stats_matches(r, flt))
        return await self.stats_collector.containers(found)

    def pod_containers(self, sandbox_id: str) -> builtins.list[ContainerRecord]:
        """The pod's visible containers, oldest first."""
        return ordered(r for r in self.store.all() if r.visible and r.sandbox_id == sandbox_id)

    def pod_container_statuses(self, sandbox_id: str) -> builtins.list[api_pb2.ContainerStatus]:
        """What PodSandboxStatus carries for the kubelet's evented PLEG."""
        return [to_status(r) for r in self.pod_containers(sandbox_id)]

    async def pod_stats(self, sandbox_id: str) -> api_pb2.PodSandboxStats:
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id must not be empty")
        sandbox = self.sandboxes.resolve(sandbox_id)
        if sandbox.state is SandboxState.CREATING:
            raise NotFound(f"pod sandbox {sandbox_id!r} not found")
        return await self.stats_collector.pod(sandbox, self.pod_containers(sandbox.id))

    async def list_pod_stats(self, flt: api_pb2.PodSandboxStatsFilter | None = None
                             ) -> builtins.list[api_pb2.PodSandboxStats]:
        sandboxes = sorted((s for s in self.sandboxes.all() if _pod_matches(s, flt)),
                           key=lambda s: (s.created_at, s.id))
        return list(await asyncio.gather(*(
            self.stats_collector.pod(s, self.pod_containers(s.id)) for s in sandboxes)))

    # -- hooks for the sandbox and image layers

    async def stop_all(self, sandbox_id: str, timeout: float) -> None:
        """Stop every container of a sandbox (after any create in flight in it; creates
        that begin from now on are refused)."""
        self.stopping.add(sandbox_id)
        pending = list(self.creating.get(sandbox_id, ()))
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        recs = self.pod_containers(sandbox_id)
        await asyncio.gather(*(container_stop.stop(self, r, timeout) for r in recs if r.live))

    async def remove_all(self, sandbox_id: str) -> None:
        """Remove every container of a sandbox."""
        await self.stop_all(sandbox_id, 0)
        recs = [r for r in self.store.all() if r.sandbox_id == sandbox_id]
        await asyncio.gather(*(container_stop.remove(self, r) for r in recs))
        self.stats_collector.forget_pod(sandbox_id)
        self.stopping.discard(sandbox_id)

    def state_counts(self) -> dict[str, int]:
        """Visible containers by state (the Prometheus `crib_containers` gauge)."""
        counts = {s.value: 0 for s in ContainerState if s is not ContainerState.CREATING}
        for r in self.store.all():
            if r.visible:
                counts[r.state.value] += 1
        return counts

    def image_in_use(self, image_id: str) -> bool:
        """RemoveImage's check: does any container (even one being created) use it?"""
        return any(r.image_id == image_id for r in self.store.all())

    async def container_filesystems(self) -> builtins.list[api_pb2.FilesystemUsage]:
        """ImageFsInfo's container_filesystems: every writable layer, summed."""
        recs = self.store.all()

        def measure() -> tuple[int, int]:
            total, inodes = 0, 0
            for r in recs:
                used, count = rootfs.usage(r.paths)
                total, inodes = total + used, inodes + count
            return total, inodes

        used, inodes = await asyncio.to_thread(measure)
        return [api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.bundle_dir)),
            used_bytes=api_pb2.UInt64Value(value=used),
            inodes_used=api_pb2.UInt64Value(value=inodes))]

    # -- bookkeeping the steps call back into

    def exit_event(self, container_id: str) -> asyncio.Event:
        event = self._exit_events.get(container_id)
        if event is None:
            event = self._exit_events[container_id] = asyncio.Event()
        return event

    def exit_watcher_forget(self, container_id: str) -> None:
        if self._watcher is not None:
            self._watcher.forget(container_id)

    def created(self, rec: ContainerRecord) -> None:
        self.monitor_watch.watch(rec.id, rec.conmon_pid)
        self._publish(api_pb2.ContainerEventType.CONTAINER_CREATED_EVENT, rec)
        self._spawn(record_exit(self, rec.id))  # killed before we were watching?

    def exited(self, rec: ContainerRecord) -> None:
        self.monitor_watch.unwatch(rec.id)
        self.exit_event(rec.id).set()
        self._processes.pop(rec.id, None)
        self._publish(api_pb2.ContainerEventType.CONTAINER_STOPPED_EVENT, rec)

    def removed(self, rec: ContainerRecord) -> None:
        self._exit_events.pop(rec.id, None)
        self._processes.pop(rec.id, None)
        self.messages.forget(rec.id)
        self.stats_collector.forget(rec.id)
        self._publish(api_pb2.ContainerEventType.CONTAINER_DELETED_EVENT, rec)

    def _exit_file(self, container_id: str, _code: int, _finished: int) -> None:
        if self.store.find(container_id) is not None:
            self._spawn(record_exit(self, container_id))

    def _monitor_gone(self, container_id: str) -> None:
        self._spawn(record_exit(self, container_id, monitor_gone=True))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("container background step failed", exc_info=task.exception())

    def _publish(self, kind: int, rec: ContainerRecord) -> None:
        if self.events is None or not self.events.wanted:
            return
        self.events.publish(self.event(kind, rec))

    def event(self, kind: int, rec: ContainerRecord) -> api_pb2.ContainerEventResponse:
        """A lifecycle event of `rec`: with its pod's status and every container status
        of the pod, as they are now (a removed container is no longer among them)."""
        event = api_pb2.ContainerEventResponse(
            container_id=rec.id, container_event_type=kind,  # type: ignore[arg-type]
            created_at=time.time_ns(),
            containers_statuses=[to_status(r) for r in self.pod_containers(rec.sandbox_id)])
        sandbox = self.sandboxes.find(rec.sandbox_id)
        if sandbox is not None:
            event.pod_sandbox_status.CopyFrom(sandbox_status(sandbox).status)
        return event


def _pod_matches(sandbox: SandboxRecord, flt: api_pb2.PodSandboxStatsFilter | None) -> bool:
    if sandbox.state is SandboxState.CREATING:
        return False
    if flt is None:
        return True
    if flt.id and not sandbox.id.startswith(flt.id):
        return False
    return not flt.label_selector or labels_match(flt.label_selector,
                                                  sandbox.pod_config().labels)


def _read_spec(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError), path.open() as f:
        spec = json.load(f)
        return spec if isinstance(spec, dict) else None
    return None
