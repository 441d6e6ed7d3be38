"""Build a container's OCI runtime spec (config.json) from the CRI request.

Inputs: the CRI ``ContainerConfig`` and ``PodSandboxConfig``, the image config
(the OCI image config blob or its ``config`` object), and three records of
facts the caller gathers: :class:`SandboxContext` (the pod's namespaces and
files), :class:`ContainerContext` (this container's rootfs and cgroup) and
:class:`HostFacts` (what the host supports, probed once at start-up). Output: a
:class:`BuiltSpec` with the config.json dict (OCI runtime spec 1.0.2 as runc 1.1
accepts it) and the resolved facts the caller records (stop signal, user,
mounts, seccomp profile).

The builder reads small files (the image's /etc/passwd and /etc/group, a
Localhost seccomp profile, /proc/self/mountinfo, device nodes) but runs
nothing: :func:`build_spec` is sync, :func:`build_spec_async` runs it off the
event loop.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, Unimplemented
from runtimeservice import capabilities as capmod
from runtimeservice import ocispec_devices, ocispec_mounts, ocispec_process, ocispec_security
from runtimeservice import sysctls as sysctlmod
from runtimeservice.ocispec_mounts import DefaultMountFacts, ResolvedMount
from runtimeservice.userdb import ResolvedUser, resolve_user

log = logging.getLogger(__name__)

OCI_VERSION: Final = "1.0.2-dev"


class Ns(enum.Enum):
    """A namespace that is not joined by path: the host's, or a fresh one."""

    HOST = "host"
    NEW = "new"


# A namespace: a path to join (/proc/<pid>/ns/net, a pinned bind mount), Ns.NEW,
# or Ns.HOST; None means the host's too.
NsRef = str | Ns | None


@dataclass(frozen=True)
class SandboxContext:
    """Facts about the pod sandbox the container joins."""

    sandbox_id: str
    hostname: str = ""
    net_ns: NsRef = None
    ipc_ns: NsRef = None
    uts_ns: NsRef = None
    # The pod's PID namespace: the infra process's when the pod shares one,
    # Ns.NEW when it does not (each container gets its own), host otherwise.
    pid_ns: NsRef = Ns.NEW
    user_ns: NsRef = None
    cgroup_parent: str = ""  # the pod cgroup (informational; the container's is below)
    hosts_path: str | None = None
    resolv_conf_path: str | None = None
    hostname_path: str | None = None
    shm_path: str | None = None  # None: the host's with host IPC, else a private tmpfs
    log_dir: str = ""
    # None: allowed when the pod's security context is privileged (as CRI-O rules).
    privileged_allowed: bool | None = None


@dataclass(frozen=True)
class ContainerContext:
    """Facts about this container that the caller decided."""

    container_id: str
    rootfs: str
    cgroups_path: str
    target_pid_ns: str | None = None  # pid ns path of the TARGET container
    termination_message: tuple[str, str] | None = None  # (container path, host path)
    pids_limit: int | None = None
    sysctls: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HostFacts:
    """What the host (kernel, runtime, daemon's own privileges) supports."""

    cap_bounding: frozenset[str] = field(default_factory=lambda: frozenset(capmod.CAPABILITIES))
    machine: str = "x86_64"
    cgroup_v2: bool = False  # unified hierarchy only
    hugetlb_supported: bool = True  # the hugetlb controller is there to take page limits
    swap_supported: bool = True  # memory+swap limits can be set (v1: memory.memsw.*)
    rro_supported: bool = False
    seccomp_supported: bool = True
    apparmor_supported: bool = False
    apparmor_default_profile: str = "crib-default"
    userns_supported: bool = False
    idmap_mounts_supported: bool = False
    oom_score_adj_min: int | None = None  # the daemon's own score when it cannot go lower
    mountinfo_path: str = "/proc/self/mountinfo"
    dev_root: str = "/dev"

    @classmethod
    def probe(cls) -> HostFacts:
        """Read the facts off this host (start-up only: a few small /proc and /sys reads)."""
        status = _read("/proc/self/status")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        bounding = capmod.parse_mask(fields.get("CapBnd", "0"))
        effective = capmod.parse_mask(fields.get("CapEff", "0"))
        oom_min = None
        if "CAP_SYS_RESOURCE" not in effective:
            oom_min = int(_read("/proc/self/oom_score_adj").strip() or 0)
        release = os.uname().release.split("-")[0].split(".")
        kernel = tuple(int(p) for p in release[:2] if p.isdigit())
        cgroup_v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        if cgroup_v2:
            controllers = _read("/sys/fs/cgroup/cgroup.controllers").split()
            hugetlb, swap = "hugetlb" in controllers, True
        else:
            hugetlb = os.path.isdir("/sys/fs/cgroup/hugetlb")
            swap = os.path.exists("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
        return cls(
            cap_bounding=bounding,
            machine=os.uname().machine,
            cgroup_v2=cgroup_v2,
            hugetlb_supported=hugetlb,
            swap_supported=swap,
            rro_supported=kernel >= (5, 12),
            seccomp_supported="Seccomp" in fields,
            apparmor_supported=_read("/sys/module/apparmor/parameters/enabled").strip() == "Y",
            oom_score_adj_min=oom_min,
        )


@dataclass(frozen=True)
class BuiltSpec:
    """The config.json and what the caller records beside it."""

    spec: dict[str, Any]
    stop_signal: int
    stop_signal_name: str
    user: ResolvedUser
    mounts: tuple[ResolvedMount, ...]
    privileged: bool
    seccomp_profile: str  # "unconfined", "runtime/default" or "localhost/<path>"
    apparmor_profile: str | None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _is_host(ref: NsRef) -> bool:
    return ref is None or ref is Ns.HOST


def _ns_entry(kind: str, ref: NsRef) -> dict[str, str] | None:
    if _is_host(ref):
        return None
    if ref is Ns.NEW:
        return {"type": kind}
    assert isinstance(ref, str)
    return {"type": kind, "path": ref}


def _namespaces(
    config: api_pb2.ContainerConfig,
    sandbox: SandboxContext,
    container: ContainerContext,
    host: HostFacts,
) -> list[dict[str, str]]:
    opts = config.linux.security_context.namespace_options
    pid_mode = opts.pid
    if pid_mode == api_pb2.POD:
        pid: NsRef = sandbox.pid_ns  # whatever the pod has: shared, per container or host
    elif pid_mode == api_pb2.CONTAINER:
        pid = Ns.NEW
    elif pid_mode == api_pb2.NODE:
        pid = Ns.HOST
    elif pid_mode == api_pb2.TARGET:
        if not container.target_pid_ns:
            raise InvalidArgument(
                f"pid namespace mode TARGET needs the target container {opts.target_id!r}"
            )
        pid = container.target_pid_ns
    else:
        raise InvalidArgument(f"unknown pid namespace mode {pid_mode}")
    user: NsRef = None
    if opts.HasField("userns_options") and opts.userns_options.mode == api_pb2.POD:
        if not host.userns_supported:
            raise Unimplemented("user namespaces are not supported by this runtime")
        if _is_host(sandbox.user_ns):
            raise FailedPrecondition(f"sandbox {sandbox.sandbox_id} has no user namespace")
        user = sandbox.user_ns
    entries = [
        _ns_entry("pid", pid),
        _ns_entry("network", sandbox.net_ns),
        _ns_entry("ipc", sandbox.ipc_ns),
        _ns_entry("uts", sandbox.uts_ns),
        {"type": "mount"},
        _ns_entry("user", user),
        {"type": "cgroup"} if host.cgroup_v2 else None,
    ]
    return [e for e in entries if e is not None]


def _resources(
    res: api_pb2.LinuxContainerResources | None,
    host: HostFacts,
    pids_limit: int | None,
    device_rules: list[dict[str, Any]],
) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": device_rules}
    if pids_limit is not None:
        out["pids"] = {"limit": pids_limit}
    if res is None:
        return out
    for name in ("cpu_period", "cpu_shares", "memory_limit_in_bytes"):
        if getattr(res, name) < 0:
            raise InvalidArgument(f"resources {name} {getattr(res, name)} is negative")
    cpu: dict[str, Any] = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    limit, swap = res.memory_limit_in_bytes, res.memory_swap_limit_in_bytes
    if limit:
        memory["limit"] = limit
    if swap:
        if swap != -1 and (swap < 0 or (limit and swap < limit)):
            raise InvalidArgument(
                f"memory_swap_limit_in_bytes {swap} is below memory_limit_in_bytes {limit}"
            )
        if host.swap_supported:
            memory["swap"] = swap
        else:
            log.debug("no swap accounting on this host: memory_swap_limit_in_bytes ignored")
    if memory:
        out["memory"] = memory
    if res.hugepage_limits and not host.hugetlb_supported:
        log.debug("no hugetlb cgroup controller on this host: hugepage_limits ignored")
    elif res.hugepage_limits:
        out["hugepageLimits"] = [
            {"pageSize": h.page_size, "limit": h.limit} for h in res.hugepage_limits
        ]
    if res.unified:
        if not host.cgroup_v2:
            keys = ", ".join(sorted(res.unified))
            raise InvalidArgument(f"unified cgroup keys ({keys}) need a cgroup v2 host")
        out["unified"] = dict(res.unified)
    return out


def build_spec(
    config: api_pb2.ContainerConfig,
    pod: api_pb2.PodSandboxConfig,
    image: Mapping[str, Any],
    sandbox: SandboxContext,
    container: ContainerContext,
    host: HostFacts,
) -> BuiltSpec:
    """The container's config.json and the facts resolved on the way (see the module doc)."""
    img = ocispec_process.image_runtime_config(image)
    linux = config.linux
    sc = linux.security_context
    privileged = sc.privileged
    allowed = sandbox.privileged_allowed
    if allowed is None:
        allowed = pod.linux.security_context.privileged
    if privileged and not allowed:
        raise InvalidArgument(
            f"privileged container {config.metadata.name!r} in a non-privileged sandbox"
        )

    args = ocispec_process.process_args(config, img)
    user = resolve_user(container.rootfs, ocispec_process.user_request(config, img))
    caps = ocispec_security.capability_sets(sc, privileged, host.cap_bounding)
    seccomp_spec, seccomp_name = ocispec_security.seccomp_profile(
        sc, privileged, caps, machine=host.machine, seccomp_supported=host.seccomp_supported
    )
    apparmor = ocispec_security.apparmor_profile(
        sc,
        privileged,
        apparmor_supported=host.apparmor_supported,
        default_profile=host.apparmor_default_profile,
    )
    masked, readonly_paths = ocispec_security.masked_and_readonly_paths(sc, privileged)

    cri_mounts = tuple(
        ocispec_mounts.resolve_cri_mount(
            m,
            rro_supported=host.rro_supported,
            idmap_supported=host.idmap_mounts_supported,
            mountinfo_path=host.mountinfo_path,
        )
        for m in config.mounts
    )
    defaults = ocispec_mounts.default_mounts(
        DefaultMountFacts(
            privileged=privileged,
            readonly_rootfs=sc.readonly_rootfs,
            host_network=_is_host(sandbox.net_ns),
            host_ipc=_is_host(sandbox.ipc_ns),
            shm_path=sandbox.shm_path,
            hosts_path=sandbox.hosts_path,
            resolv_conf_path=sandbox.resolv_conf_path,
            hostname_path=sandbox.hostname_path,
            termination_message=container.termination_message,
        )
    )
    devices, device_rules = ocispec_devices.build_devices(
        config.devices, privileged, host.dev_root
    )
    checked_sysctls = sysctlmod.validate(
        container.sysctls,
        host_network=_is_host(sandbox.net_ns),
        host_ipc=_is_host(sandbox.ipc_ns),
        host_uts=_is_host(sandbox.uts_ns),
    )

    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": {
            "uid": user.uid,
            "gid": user.gid,
            "additionalGids": list(user.additional_gids),
        },
        "args": args,
        "env": ocispec_process.process_env(config, img, sandbox.hostname or pod.hostname),
        "cwd": ocispec_process.working_dir(config, img),
        "capabilities": caps.to_oci(),
        "noNewPrivileges": sc.no_new_privs,
    }
    if linux.HasField("resources"):
        process["oomScoreAdj"] = ocispec_process.oom_score_adj(
            linux.resources.oom_score_adj, host.oom_score_adj_min
        )
    if apparmor:
        process["apparmorProfile"] = apparmor

    linux_spec: dict[str, Any] = {
        "namespaces": _namespaces(config, sandbox, container, host),
        "resources": _resources(
            linux.resources if linux.HasField("resources") else None,
            host,
            container.pids_limit,
            device_rules,
        ),
        "cgroupsPath": container.cgroups_path,
        "devices": devices,
    }
    if masked:
        linux_spec["maskedPaths"] = masked
    if readonly_paths:
        linux_spec["readonlyPaths"] = readonly_paths
    if seccomp_spec is not None:
        linux_spec["seccomp"] = seccomp_spec
    if checked_sysctls:
        linux_spec["sysctl"] = {s.name: s.value for s in checked_sysctls}
    propagation = ocispec_mounts.rootfs_propagation(cri_mounts)
    if propagation:
        linux_spec["rootfsPropagation"] = propagation

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": container.rootfs, "readonly": sc.readonly_rootfs},
        "mounts": ocispec_mounts.merge_mounts(defaults, cri_mounts),
        "annotations": dict(config.annotations),
        "linux": linux_spec,
    }
    if sandbox.uts_ns is Ns.NEW and sandbox.hostname:
        # Only a fresh UTS namespace needs its name; a joined one already has it.
        spec["hostname"] = sandbox.hostname
    signal = ocispec_process.stop_signal(config, img)
    log.debug("built spec for container %s", container.container_id)
    return BuiltSpec(
        spec=spec,
        stop_signal=signal,
        stop_signal_name=ocispec_process.signal_name(signal),
        user=user,
        mounts=cri_mounts,
        privileged=privileged,
        seccomp_profile=seccomp_name,
        apparmor_profile=apparmor,
    )


async def build_spec_async(
    config: api_pb2.ContainerConfig,
    pod: api_pb2.PodSandboxConfig,
    image: Mapping[str, Any],
    sandbox: SandboxContext,
    container: ContainerContext,
    host: HostFacts,
) -> BuiltSpec:
    """:func:`build_spec` in a worker thread (it reads files from the image and /proc)."""
    return await asyncio.to_thread(build_spec, config, pod, image, sandbox, container, host)
