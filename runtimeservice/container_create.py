"""CreateContainer: sandbox and input checks → image → record (CREATING) → directories
→ overlay rootfs → OCI spec → conmon + `<runtime> create` → record (CREATED).

Every step registers its undo before (or right after) it makes something, so
a failure unwinds in reverse and leaves nothing: no mount, no cgroup, no
process, no runtime state, no record, no reserved name. The CREATING record is
written first, so a daemon killed midway finds it at start and the same
cleanup runs then (container_recover.py).

A failure is counted in `crib_operation_failures_total{operation="CreateContainer"}`
under the step that failed (failure_steps.py).

The work runs in a task detached from the RPC (`Reservations.create_once`):
an identical retry of a call that is still running joins it and gets the same
id; a cancelled call does not leave a half-made container behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import posixpath
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, NotFound
from cri.fsutil import atomic_write_json
from runtimeservice import failure_steps as step
from runtimeservice import rootfs
from runtimeservice.cgroups import CgroupPath, container_cgroup_path
from runtimeservice.container import ContainerRecord, ContainerState, reservation_name
from runtimeservice.container_images import ContainerImage
from runtimeservice.monitor import MonitorSpec
from runtimeservice.names import fingerprint
from runtimeservice.oci import OciRuntime
from runtimeservice.ocispec import (
    BuiltSpec,
    ContainerContext,
    Ns,
    NsRef,
    SandboxContext,
    build_spec_async,
)
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.undo import UndoStack

if TYPE_CHECKING:
    from runtimeservice.containers import ContainerManager

log = logging.getLogger(__name__)

MONITOR_LOG = "console.log"  # conmon's log when the pod has no log directory


def cri_log_path(log_directory: str, log_path: str) -> str:
    """The host path of a container's CRI log: the sandbox's `log_directory` joined
    with the container's `log_path`, which must stay inside it ("" when unset)."""
    if not log_path:
        return ""
    if "\0" in log_path or ":" in log_path or "\n" in log_path:
        raise InvalidArgument(f"log_path {log_path!r} contains a character that is not allowed")
    if posixpath.isabs(log_path):
        raise InvalidArgument(
            f"log_path {log_path!r} must be relative to the sandbox's log_directory")
    if not log_directory:
        raise InvalidArgument(
            f"log_path {log_path!r} is set but the pod sandbox has no log_directory")
    base = posixpath.normpath(log_directory)
    joined = posixpath.normpath(posixpath.join(base, log_path))
    if not joined.startswith(base.rstrip("/") + "/"):
        raise InvalidArgument(
            f"log_path {log_path!r} escapes the sandbox's log_directory {log_directory!r}")
    return joined


def _ns(path: str) -> NsRef:
    return path or Ns.HOST


def sandbox_context(sandbox: SandboxRecord, hostname: str) -> SandboxContext:
    """What a container joins: the pod's pinned namespaces, files and cgroup."""
    pod = sandbox.pod_config()
    pid_mode = pod.linux.security_context.namespace_options.pid
    pid: NsRef
    if sandbox.pidns:
        pid = sandbox.pidns
    elif pid_mode == api_pb2.NamespaceMode.NODE:
        pid = Ns.HOST
    else:
        pid = Ns.NEW
    files = {name: path for name, path in sandbox.pod_files.items() if os.path.exists(path)}
    return SandboxContext(
        sandbox_id=sandbox.id, hostname=hostname, net_ns=_ns(sandbox.netns),
        ipc_ns=_ns(sandbox.ipcns), uts_ns=_ns(sandbox.utsns), pid_ns=pid,
        cgroup_parent=sandbox.cgroup, hosts_path=files.get("hosts"),
        resolv_conf_path=files.get("resolv.conf"), hostname_path=files.get("hostname"),
        shm_path=sandbox.shm or None, log_dir=pod.log_directory)


def _read_hostname(sandbox: SandboxRecord) -> str:
    try:
        with open(sandbox.pod_files["hostname"]) as f:
            return f.read().strip()
    except OSError:
        return sandbox.pod_config().hostname


def _mount_dicts(built: BuiltSpec) -> tuple[dict[str, object], ...]:
    return tuple(
        {"container_path": m.container_path, "host_path": m.host_path, "readonly": m.readonly,
         "propagation": m.propagation, "recursive_read_only": m.recursive_read_only}
        for m in built.mounts)


def _check_ready(mgr: ContainerManager, sandbox_id: str, sandbox: SandboxRecord | None,
                 name: str) -> None:
    """FailedPrecondition unless the sandbox is READY and not being stopped."""
    if sandbox is None:
        state = "removed"
    elif sandbox_id in mgr.stopping:
        state = "stopping"
    elif sandbox.state is not SandboxState.READY:
        state = sandbox.state.value
    else:
        return
    raise FailedPrecondition(
        f"pod sandbox {sandbox_id} is not ready ({state}): cannot create container "
        f"{name!r} in it")


async def create(mgr: ContainerManager, req: api_pb2.CreateContainerRequest) -> str:
    """Validate, then create once per identical request; returns the container id."""
    config = req.config
    if not req.pod_sandbox_id:
        raise InvalidArgument("pod_sandbox_id must not be empty")
    if not config.metadata.name:
        raise InvalidArgument("config.metadata.name must not be empty")
    if not config.image.image:
        raise InvalidArgument(f"container {config.metadata.name!r}: config.image.image is empty")
    sandbox = mgr.sandboxes.resolve(req.pod_sandbox_id)
    _check_ready(mgr, sandbox.id, sandbox, config.metadata.name)
    pod = sandbox.pod_config()
    log_path = cri_log_path(pod.log_directory, config.log_path)
    name = reservation_name(config, pod.metadata)
    fp = fingerprint(req)
    return await mgr.reservations.create_once(
        name, fp, lambda: _create(mgr, config, sandbox, name, fp, log_path))


async def _create(mgr: ContainerManager, config: api_pb2.ContainerConfig,
                  sandbox: SandboxRecord, name: str, fp: str, log_path: str) -> str:
    failing = step.FailureSteps("CreateContainer", step.IMAGE)
    image = mgr.images.find(config.image.image)
    if image is None:
        failing.fail()
        raise NotFound(f"image {config.image.image!r} not found: pull it before creating "
                       f"container {config.metadata.name!r}")
    cid = secrets.token_hex(32)
    persist_dir = mgr.run_dir / cid
    cgroup = container_cgroup_path(CgroupPath(sandbox.cgroup, sandbox.cgroup_runc), cid,
                                   mgr.cgroups.driver)
    rec = ContainerRecord(
        id=cid, sandbox_id=sandbox.id, name=name,
        config=config.SerializeToString(deterministic=True), fingerprint=fp,
        runtime_handler=sandbox.runtime_handler or mgr.cfg.runtime.default_handler,
        created_at=time.time_ns(), state=ContainerState.CREATING,
        dir=str(mgr.bundle_dir / cid), persist_dir=str(persist_dir), log_path=log_path,
        monitor_log=log_path or str(persist_dir / MONITOR_LOG), cgroup=cgroup.path,
        image_id=image.id, image_ref=image.ref,
        resources=(config.linux.resources.SerializeToString(deterministic=True)
                   if config.linux.HasField("resources") else b""),
        labels=dict(config.labels), annotations=dict(config.annotations))
    runtime = mgr.runtime(rec.runtime_handler)
    task = asyncio.current_task()
    creating = mgr.creating.setdefault(sandbox.id, set())
    if task is not None:
        creating.add(task)
    try:
        async with UndoStack(f"CreateContainer {cid[:12]}") as undo, failing:
            failing.at(step.RECORD)
            await asyncio.to_thread(mgr.store.put, rec)
            undo.push("delete the record", lambda: mgr.store.delete(cid))
            undo.push("remove the directories", lambda: asyncio.to_thread(remove_dirs, rec))
            await asyncio.to_thread(_make_dirs, rec)
            undo.push("remove the rootfs", lambda: rootfs.remove(rec.paths))
            failing.at(step.MOUNT)
            await rootfs.mount(await asyncio.to_thread(mgr.images.lowerdirs, image), rec.paths)
            failing.at(step.SPEC)
            built = await _build(mgr, config, sandbox, rec, image, cgroup.runc, runtime)
            await asyncio.to_thread(atomic_write_json, Path(rec.dir) / "config.json",
                                    built.spec, False)
            undo.push("destroy the runtime container", lambda: mgr.destroy(rec))
            failing.at(step.OCI_RUNTIME)
            mc = await mgr.monitor.create(runtime, MonitorSpec(
                container_id=cid, bundle=rec.bundle, persist_dir=rec.persist_dir,
                log_path=rec.monitor_log, name=config.metadata.name, stdin=config.stdin,
                stdin_once=config.stdin_once, terminal=config.tty))
            rec = dataclasses.replace(
                rec, state=ContainerState.CREATED, pid=mc.pid, conmon_pid=mc.conmon_pid,
                stop_signal=built.stop_signal, stop_signal_name=built.stop_signal_name,
                uid=built.user.uid, gid=built.user.gid, groups=built.user.additional_gids,
                mounts=_mount_dicts(built))
            failing.at(step.SANDBOX)
            _check_ready(mgr, sandbox.id, mgr.sandboxes.find(sandbox.id), config.metadata.name)
            failing.at(step.RECORD)
            await asyncio.to_thread(mgr.store.put, rec)
            undo.commit()
    except BaseException:
        await asyncio.shield(mgr.monitor.release_cgroup())
        raise
    finally:
        if task is not None:
            creating.discard(task)
            if not creating:
                mgr.creating.pop(sandbox.id, None)
    log.info("container %s created: %s in sandbox %s (image %s)", cid[:12], name,
             sandbox.id[:12], image.id[:19])
    mgr.created(rec)
    return cid


async def _build(mgr: ContainerManager, config: api_pb2.ContainerConfig,
                 sandbox: SandboxRecord, rec: ContainerRecord, image: ContainerImage,
                 cgroups_path: str, runtime: OciRuntime) -> BuiltSpec:
    hostname = await asyncio.to_thread(_read_hostname, sandbox)
    ctx = ContainerContext(
        container_id=rec.id, rootfs=str(rec.paths.merged), cgroups_path=cgroups_path,
        target_pid_ns=_target_pid_ns(mgr, config, sandbox),
        pids_limit=mgr.cfg.runtime.pids_limit or None)
    host = await mgr.host_facts(runtime)
    return await build_spec_async(config, sandbox.pod_config(), image.config,
                                  sandbox_context(sandbox, hostname), ctx, host)


def _target_pid_ns(mgr: ContainerManager, config: api_pb2.ContainerConfig,
                   sandbox: SandboxRecord) -> str | None:
    opts = config.linux.security_context.namespace_options
    if opts.pid != api_pb2.NamespaceMode.TARGET:
        return None
    target = mgr.store.find(opts.target_id) if opts.target_id else None
    if target is None or not target.visible or target.sandbox_id != sandbox.id:
        raise NotFound(f"target container {opts.target_id!r} of the TARGET pid namespace is "
                       f"not a container of pod sandbox {sandbox.id}")
    if target.state is not ContainerState.RUNNING or not target.pid:
        raise FailedPrecondition(f"target container {opts.target_id} is not running")
    return f"/proc/{target.pid}/ns/pid"


def _make_dirs(rec: ContainerRecord) -> None:
    os.makedirs(rec.dir, mode=0o700)
    os.makedirs(rec.persist_dir, mode=0o700)


def remove_dirs(rec: ContainerRecord) -> None:
    for d in (rec.dir, rec.persist_dir):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(d)

