"""What a sandbox owns on the host, and how each piece is made and removed.

Every remover here is idempotent and works from the record alone, whatever
state the sandbox reached: RunPodSandbox registers them as its undo steps,
StopPodSandbox and RemovePodSandbox call them, and recovery after a crash
runs them all on a sandbox that was still CREATING.

Paths are deterministic from the sandbox id:
  <runroot>/ns/<id>/{net,ipc,uts}   pinned namespaces
  <runroot>/pods/<id>/shm            the pod's /dev/shm (tmpfs)
  <runroot>/pods/<id>/infra          the infra process's OCI bundle
  <root>/pods/<id>/                  resolv.conf, hostname, hosts
``<runroot>/pods`` is a private mount point of its own, so the shm mounts do
not propagate into other mount namespaces on hosts where / is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from api import api_pb2
from cri.config import Config
from cri.errors import FailedPrecondition, Internal
from runtimeservice import cgroups, namespaces
from runtimeservice.cgroups import CgroupDriver, CgroupManager, CgroupPath
from runtimeservice.cni import PodNetwork, PodRef
from runtimeservice.oci import OciRuntime
from runtimeservice.sandbox import SandboxRecord
from runtimeservice.sandbox_infra import InfraRunner

log = logging.getLogger(__name__)

SHM_SIZE = 64 * 1024 * 1024
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MNT_DETACH = 2


class ContainerHooks(Protocol):
    """What the container layer does for a sandbox's containers on Stop and Remove."""

    def stop_all(self, sandbox_id: str, timeout: float) -> Awaitable[None]: ...

    def remove_all(self, sandbox_id: str) -> Awaitable[None]: ...


class NoContainers:
    """The hooks until the container layer registers its own."""

    async def stop_all(self, sandbox_id: str, timeout: float) -> None:
        return None

    async def remove_all(self, sandbox_id: str) -> None:
        return None


# ------------------------------------------------------------------ /dev/shm


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_shm_sync(target: Path, size: int) -> None:
    target.mkdir(parents=True, exist_ok=True, mode=0o755)
    if os.path.ismount(target):
        return
    data = f"mode=1777,size={size}".encode()
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc().mount(b"shm", os.fsencode(target), b"tmpfs", flags, data) != 0:
        err = ctypes.get_errno()
        raise Internal(f"cannot mount the pod's /dev/shm on {target}: {os.strerror(err)}")


def _unmount_sync(target: Path) -> None:
    for _ in range(16):  # stacked mounts, if any
        if _libc().umount2(os.fsencode(target), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):
                break
            raise Internal(f"cannot unmount {target}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        target.rmdir()


# ------------------------------------------------------------------ paths


@dataclass(frozen=True)
class SandboxPaths:
    ns_dir: Path
    run_dir: Path
    pod_dir: Path

    @property
    def shm(self) -> Path:
        return self.run_dir / "shm"

    @property
    def bundle(self) -> Path:
        return self.run_dir / "infra"


def pod_ref(rec: SandboxRecord) -> PodRef:
    meta = rec.metadata
    return PodRef(namespace=meta.namespace, name=meta.name, uid=meta.uid)


def shares_pid(rec: SandboxRecord) -> bool:
    opts = rec.pod_config().linux.security_context.namespace_options
    return opts.pid == api_pb2.NamespaceMode.POD


@dataclass
class SandboxResources:
    """Makes and removes the host resources of sandboxes."""

    cfg: Config
    cgroups: CgroupManager
    network: PodNetwork
    runtimes: Callable[[str], OciRuntime]  # handler name ("" = default) -> its runtime
    _prepared: set[Path] = field(default_factory=set)

    @property
    def driver(self) -> CgroupDriver:
        return self.cgroups.driver

    def paths(self, sandbox_id: str) -> SandboxPaths:
        return SandboxPaths(ns_dir=Path(self.cfg.runroot) / "ns" / sandbox_id,
                            run_dir=Path(self.cfg.runroot) / "pods" / sandbox_id,
                            pod_dir=Path(self.cfg.root) / "pods" / sandbox_id)

    def cgroup_path(self, cgroup_parent: str, sandbox_id: str) -> CgroupPath:
        return self.cgroups.pod_path(cgroup_parent, sandbox_id)

    def infra_runner(self, handler: str) -> InfraRunner | None:
        """The runner for `handler`, None when it is no longer configured."""
        try:
            return InfraRunner(self.runtimes(handler))
        except KeyError:
            return None

    def infra_cgroup(self, rec: SandboxRecord) -> str:
        pod = CgroupPath(path=rec.cgroup, runc=rec.cgroup_runc)
        return cgroups.container_cgroup_path(pod, rec.id, self.driver).runc

    # -- shm

    async def mount_shm(self, target: Path) -> None:
        parent = target.parent.parent
        if parent not in self._prepared:
            await asyncio.to_thread(namespaces.prepare_root, parent)
            self._prepared.add(parent)
        await asyncio.to_thread(_mount_shm_sync, target, SHM_SIZE)

    async def unmount_shm(self, rec: SandboxRecord) -> None:
        await asyncio.to_thread(_unmount_sync, self.paths(rec.id).shm)

    # -- removers (idempotent)

    async def stop_infra(self, rec: SandboxRecord) -> None:
        runner = self.infra_runner(rec.runtime_handler)
        bundle = self.paths(rec.id).bundle
        if runner is None:
            if rec.infra_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rec.infra_pid, signal.SIGKILL)
            await asyncio.to_thread(shutil.rmtree, bundle, True)
            return
        await runner.stop(rec.id, bundle, rec.infra_pid, rec.infra_start)

    async def detach_network(self, rec: SandboxRecord) -> None:
        """CNI DEL (retried; fine when the namespace is gone). Before unpinning."""
        if not rec.netns:
            return
        await self.network.delete(Path(rec.netns), rec.id, pod_ref(rec))

    async def unpin_namespaces(self, rec: SandboxRecord) -> None:
        await namespaces.remove(self.paths(rec.id).ns_dir)

    async def remove_run_dir(self, rec: SandboxRecord) -> None:
        paths = self.paths(rec.id)
        await self.unmount_shm(rec)  # first: rmtree must never descend into the tmpfs
        await asyncio.to_thread(shutil.rmtree, paths.run_dir, True)

    async def remove_pod_files(self, rec: SandboxRecord) -> None:
        await asyncio.to_thread(shutil.rmtree, self.paths(rec.id).pod_dir, True)

    async def remove_cgroup(self, rec: SandboxRecord) -> None:
        """Remove the pod cgroup; processes still in it belong to the pod and are killed."""
        for _ in range(3):
            try:
                await self.cgroups.remove(rec.cgroup)
                return
            except FailedPrecondition:
                pids = await self.cgroups.pids(rec.cgroup)
                log.warning("sandbox %s: killing leftover processes %s in its cgroup",
                            rec.id[:12], pids)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.05)
        await self.cgroups.remove(rec.cgroup)

    async def teardown(self, rec: SandboxRecord, *, network: bool) -> None:
        """Remove everything the sandbox may own, in reverse order of creation.

        `network`: run CNI DEL too (a sandbox whose ADD may have started and
        whose DEL has not succeeded since). Each step runs even if an earlier
        one failed, except unpinning after a failed DEL; the first error is
        raised at the end, so the caller keeps the record and a retry
        finishes the job.
        """
        first: BaseException | None = None
        network_failed = False
        steps = [self.stop_infra, self.detach_network, self.unpin_namespaces,
                 self.remove_run_dir, self.remove_pod_files, self.remove_cgroup]
        if not network:
            steps.remove(self.detach_network)
        for step in steps:
            if step == self.unpin_namespaces and network_failed:
                continue  # keep the netns for the CNI DEL of the next attempt
            try:
                await step(rec)
            except Exception as exc:
                log.warning("sandbox %s: %s failed: %s", rec.id[:12], step.__name__, exc)
                first = first or exc
                network_failed = network_failed or step == self.detach_network
        if first is not None:
            raise first
