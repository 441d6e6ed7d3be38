"""RunPodSandbox after validation: make every resource, in order, each with its undo.

  record (CREATING) → pod cgroup → namespaces (hostname, sysctls) → pod files
  and /dev/shm → CNI ADD (lo, port mappings, DNS), and at the same time the
  infra process (shared PID namespace only) → record READY

The CREATING record is written before anything else exists and every path is
derived from the sandbox id, so a daemon killed at any point finds the record
at start and removes whatever was made (sandbox_recover). Within the call, each
step registers its undo *before* it runs: a step that fails half-way (a CNI
plugin that allocated an IP and then failed) is still undone. The undo steps
are the idempotent removers of sandbox_resources.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

from api import api_pb2
from cri.errors import Internal
from runtimeservice import failure_steps, namespaces, podfiles
from runtimeservice.cni import PodRef
from runtimeservice.namespaces import NamespaceKind, PodNamespaces
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.sandbox_infra import InfraProcess, InfraSpec
from runtimeservice.sandbox_plan import SandboxPlan, split_sysctls
from runtimeservice.sandbox_resources import SandboxResources
from runtimeservice.store import RecordStore
from runtimeservice.sysctls import Sysctl
from runtimeservice.undo import UndoStack

log = logging.getLogger(__name__)
T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


class _Steps:
    """Milliseconds spent in each step, for the log line of a created sandbox."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.spent: list[str] = []

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.spent.append(f"{name} {(now - self.last) * 1000:.0f}")
        self.last = now

    def skip(self) -> None:
        """Start the next step's clock now (after steps noted with `timed`)."""
        self.last = time.perf_counter()

    async def timed(self, name: str, step: Awaitable[T]) -> T:
        """Await `step` and note its own duration (for steps run concurrently)."""
        start = time.perf_counter()
        try:
            return await step
        finally:
            self.spent.append(f"{name} {(time.perf_counter() - start) * 1000:.0f}")

    def __str__(self) -> str:
        return ", ".join(self.spent)


async def _together(a: Awaitable[A] | None, b: Awaitable[B] | None
                    ) -> tuple[A | None, B | None]:
    """Run the given steps at once. When one fails the other still finishes (its
    undo is registered and must find a settled state); the first error is raised."""

    async def nothing() -> None:
        return None

    ra, rb = await asyncio.gather(a or nothing(), b or nothing(), return_exceptions=True)
    if isinstance(ra, BaseException):
        if isinstance(rb, BaseException):
            log.warning("a concurrent sandbox step also failed: %s", rb)
        raise ra
    if isinstance(rb, BaseException):
        raise rb
    return ra, rb


def new_sandbox_id() -> str:
    return secrets.token_hex(32)


def _ordered_ips(ips: list[str]) -> tuple[str, ...]:
    """Pod IPs with IPv4 first (the kubelet takes the first as the primary), no duplicates."""
    unique = list(dict.fromkeys(ips))
    return tuple(sorted(unique, key=lambda ip: ipaddress.ip_address(ip).version))


def new_record(res: SandboxResources, plan: SandboxPlan, req: api_pb2.RunPodSandboxRequest,
               fingerprint: str, sandbox_id: str) -> SandboxRecord:
    paths = res.paths(sandbox_id)
    cg = res.cgroup_path(plan.cgroup_parent, sandbox_id)
    pinned = PodNamespaces(paths.ns_dir, plan.kinds)

    def pin(kind: NamespaceKind) -> str:
        path = pinned.path(kind)
        return "" if path is None else str(path)

    return SandboxRecord(
        id=sandbox_id, config=req.config.SerializeToString(deterministic=True),
        runtime_handler=req.runtime_handler, created_at=time.time_ns(),
        state=SandboxState.CREATING, fingerprint=fingerprint, ns_dir=str(paths.ns_dir),
        pod_dir=str(paths.pod_dir), run_dir=str(paths.run_dir),
        shm="" if plan.host_ipc else str(paths.shm), cgroup=cg.path, cgroup_runc=cg.runc,
        netns=pin(NamespaceKind.NET), ipcns=pin(NamespaceKind.IPC),
        utsns=pin(NamespaceKind.UTS))


async def _start_infra(res: SandboxResources, rec: SandboxRecord,
                       plan: SandboxPlan) -> InfraProcess:
    runner = res.infra_runner(plan.handler)
    if runner is None:  # plan() checked the handler; the config cannot change meanwhile
        raise Internal(f"runtime handler {plan.handler!r} is not configured")
    joined = {"network": rec.netns, "ipc": rec.ipcns, "uts": rec.utsns}
    spec = InfraSpec(sandbox_id=rec.id, bundle=res.paths(rec.id).bundle,
                     binary=res.cfg.runtime.infra_binary, cgroups_path=res.infra_cgroup(rec),
                     namespaces={k: v for k, v in joined.items() if v})
    return await runner.start(spec)


async def _attach_network(res: SandboxResources, rec: SandboxRecord, plan: SandboxPlan,
                          pod_ns: PodNamespaces, hostname: str,
                          late_sysctls: list[Sysctl]) -> tuple[str, ...]:
    """CNI ADD, then what needs the pod's interfaces: late sysctls, /etc/hosts. The IPs."""
    meta = rec.metadata
    result = await res.network.add(
        Path(rec.netns), rec.id, PodRef(meta.namespace, meta.name, meta.uid),
        port_mappings=plan.ports, dns=plan.dns)
    ips = _ordered_ips(result.pod_ips())
    if late_sysctls:
        await namespaces.apply_sysctls(pod_ns, late_sysctls)
    await asyncio.to_thread(podfiles.write_hosts, Path(rec.pod_dir), hostname, ips)
    return ips


async def create_sandbox(store: RecordStore[SandboxRecord], res: SandboxResources,
                         plan: SandboxPlan, req: api_pb2.RunPodSandboxRequest,
                         fingerprint: str) -> str:
    """Create a sandbox from a validated plan; its id. On failure nothing is left."""
    if not plan.host_network:
        await res.network.network()  # no network configured: fail before making anything
    sandbox_id = new_sandbox_id()
    rec = new_record(res, plan, req, fingerprint, sandbox_id)
    hostname = plan.hostname_for(sandbox_id)
    early_sysctls, late_sysctls = split_sysctls(plan.sysctls)
    paths = res.paths(sandbox_id)
    steps = _Steps()
    failing = failure_steps.FailureSteps("RunPodSandbox")  # counts a failure by step
    async with (store.lock(sandbox_id), UndoStack(f"RunPodSandbox {sandbox_id[:12]}") as undo,
                failing):
        await asyncio.to_thread(store.put, rec)
        undo.push("delete the record", lambda: store.delete(sandbox_id))
        steps.done("record")

        failing.at(failure_steps.CGROUP)
        undo.push("remove the pod cgroup", lambda: res.remove_cgroup(rec))
        await res.cgroups.create(rec.cgroup, plan.resources)
        steps.done("cgroup")

        failing.at(failure_steps.NAMESPACES)
        undo.push("unpin the namespaces", lambda: res.unpin_namespaces(rec))
        pod_ns = await namespaces.create(
            paths.ns_dir, plan.kinds, sysctls=early_sysctls,
            hostname=hostname if NamespaceKind.UTS in plan.kinds else None)
        steps.done("namespaces")

        failing.at(failure_steps.MOUNT)
        undo.push("remove the pod files", lambda: res.remove_pod_files(rec))
        await podfiles.write_pod_files(paths.pod_dir, hostname, plan.dns,
                                       host_network=plan.host_network)
        undo.push("remove the run directory", lambda: res.remove_run_dir(rec))
        await asyncio.to_thread(paths.run_dir.mkdir, 0o700, True, True)
        if rec.shm:
            await res.mount_shm(Path(rec.shm))
        steps.done("files+shm")

        # CNI ADD and the infra process are independent (the infra only joins the
        # pinned namespaces): they run at once, each undo registered first.
        network_step: Awaitable[tuple[str, ...]] | None = None
        infra_step: Awaitable[InfraProcess] | None = None
        if rec.netns:
            undo.push("CNI DEL", lambda: res.detach_network(rec))
            network_step = steps.timed("cni", failing.run(failure_steps.CNI, _attach_network(
                res, rec, plan, pod_ns, hostname, late_sysctls)))
        if plan.shared_pid:
            undo.push("stop the infra process", lambda: res.stop_infra(rec))
            infra_step = steps.timed("infra", failing.run(failure_steps.OCI_RUNTIME,
                                                         _start_infra(res, rec, plan)))
        attached, infra = await _together(network_step, infra_step)
        ips = attached or ()
        steps.skip()

        failing.at(failure_steps.RECORD)
        rec = await asyncio.to_thread(
            store.update, sandbox_id, state=SandboxState.READY, ips=ips,
            network_attached=bool(rec.netns), infra_pid=infra.pid if infra else 0,
            infra_start=infra.start_time if infra else 0, pidns=infra.pidns if infra else "")
        steps.done("ready")
        undo.commit()
    log.info("sandbox %s ready: %s/%s ips=%s (ms: %s)", sandbox_id[:12], plan.namespace,
             plan.name, ",".join(ips) or "-", steps)
    return sandbox_id
