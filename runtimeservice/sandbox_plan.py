"""RunPodSandbox's input, checked in full before anything is created.

`plan()` turns a RunPodSandboxRequest into a `SandboxPlan`: which namespaces
the pod owns, its hostname, DNS, sysctls, cgroup parent and limits, and host
ports. Every problem is an InvalidArgument naming the offending value, raised
before the first resource exists, so a bad request never leaves anything
behind. Pure logic: no I/O beyond reading the node's hostname.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
from dataclasses import dataclass

from api import api_pb2
from cri.config import Config
from cri.errors import InvalidArgument
from runtimeservice import cgroups, podfiles, sysctls
from runtimeservice.cgroups import CgroupDriver, CgroupResources
from runtimeservice.cni import PortMapping
from runtimeservice.namespaces import NamespaceKind
from runtimeservice.podfiles import DnsConfig
from runtimeservice.sysctls import Sysctl

NODE = api_pb2.NamespaceMode.NODE
POD = api_pb2.NamespaceMode.POD
CONTAINER = api_pb2.NamespaceMode.CONTAINER
TARGET = api_pb2.NamespaceMode.TARGET

_PROTOCOLS = {api_pb2.Protocol.TCP: "tcp", api_pb2.Protocol.UDP: "udp",
              api_pb2.Protocol.SCTP: "sctp"}
_MAX_META = 253
DEFAULT_CPU_PERIOD = 100_000


@dataclass(frozen=True)
class SandboxPlan:
    """What a valid RunPodSandbox asks for."""

    name: str
    namespace: str
    uid: str
    attempt: int
    handler: str  # the configured handler's name ("" resolved to the default)
    host_network: bool
    host_ipc: bool
    host_pid: bool
    shared_pid: bool  # one PID namespace for the pod: an infra process holds it
    hostname: str  # "" = derive from the sandbox id
    dns: DnsConfig | None
    sysctls: tuple[Sysctl, ...]
    cgroup_parent: str
    ports: tuple[PortMapping, ...]
    resources: CgroupResources | None
    log_directory: str

    @property
    def kinds(self) -> tuple[NamespaceKind, ...]:
        """The namespaces the sandbox creates and pins."""
        out = []
        if not self.host_network:
            out.append(NamespaceKind.NET)
        if not self.host_ipc:
            out.append(NamespaceKind.IPC)
        if not self.host_network:  # a host-network pod keeps the node's hostname
            out.append(NamespaceKind.UTS)
        return tuple(out)

    def hostname_for(self, sandbox_id: str) -> str:
        if self.hostname:
            return self.hostname
        return os.uname().nodename if self.host_network else sandbox_id[:12]


# ------------------------------------------------------------------ pieces


def _check_meta(meta: api_pb2.PodSandboxMetadata) -> None:
    for field in ("name", "uid", "namespace"):
        value = getattr(meta, field)
        if not value:
            raise InvalidArgument(f"pod sandbox metadata.{field} must not be empty")
        if len(value) > _MAX_META or any(c in value for c in ";=/\0") or not value.isprintable() \
                or value != value.strip():
            raise InvalidArgument(f"pod sandbox metadata.{field} {value!r} is not a valid name")


def _mode_name(mode: int) -> str:
    return api_pb2.NamespaceMode.Name(mode) if mode in api_pb2.NamespaceMode.values() \
        else str(mode)


def _namespace_modes(opts: api_pb2.NamespaceOption) -> tuple[bool, bool, bool, bool]:
    """(host_network, host_ipc, host_pid, shared_pid) from the pod's namespace options."""
    for field in ("network", "ipc", "pid"):
        mode = getattr(opts, field)
        if mode not in (POD, CONTAINER, NODE):
            raise InvalidArgument(
                f"namespace_options.{field} {_mode_name(mode)} is not valid for a pod sandbox")
    if opts.HasField("userns_options") and opts.userns_options.mode != NODE:
        raise InvalidArgument(
            f"user namespaces (userns_options.mode {_mode_name(opts.userns_options.mode)}) "
            "are not supported by crib")
    return (opts.network == NODE, opts.ipc == NODE, opts.pid == NODE, opts.pid == POD)


def port_mappings(ports: list[api_pb2.PortMapping]) -> tuple[PortMapping, ...]:
    """The mappings that publish a host port (a host_port of 0 publishes nothing)."""
    out: list[PortMapping] = []
    seen: set[tuple[int, str, str]] = set()
    for p in ports:
        if p.protocol not in _PROTOCOLS:
            raise InvalidArgument(f"port mapping protocol {p.protocol} is not TCP, UDP or SCTP")
        if not 0 <= p.host_port <= 65535:
            raise InvalidArgument(f"port mapping host_port {p.host_port} is out of range")
        if not 0 <= p.container_port <= 65535:
            raise InvalidArgument(
                f"port mapping container_port {p.container_port} is out of range")
        host_ip = ""
        if p.host_ip:
            try:
                host_ip = str(ipaddress.ip_address(p.host_ip))
            except ValueError:
                raise InvalidArgument(
                    f"port mapping host_ip {p.host_ip!r} is not an IP address") from None
        if p.host_port == 0:
            continue
        if p.container_port == 0:
            raise InvalidArgument(f"port mapping for host port {p.host_port} has no "
                                  "container_port")
        proto = _PROTOCOLS[p.protocol]
        key = (p.host_port, proto, host_ip)
        if key in seen:
            raise InvalidArgument(f"host port {host_ip or '*'}:{p.host_port}/{proto} is "
                                  "mapped twice")
        seen.add(key)
        out.append(PortMapping(p.host_port, p.container_port, proto, host_ip))
    return tuple(out)


def _scaled_quota(quota: int, period: int, to_period: int) -> int:
    return quota * to_period // (period or DEFAULT_CPU_PERIOD)


def pod_resources(res: api_pb2.LinuxContainerResources | None,
                  overhead: api_pb2.LinuxContainerResources | None) -> CgroupResources | None:
    """The pod cgroup's limits: the pod's resources plus the runtime class overhead.

    A limit the pod does not set stays unset: the overhead alone never caps an
    unlimited pod. None when there is nothing to apply.
    """
    r = CgroupResources.from_cri(res) if res is not None else CgroupResources()
    o = CgroupResources.from_cri(overhead) if overhead is not None else CgroupResources()
    if r == CgroupResources() and o == CgroupResources():
        return None
    period = r.cpu_period
    quota = r.cpu_quota
    if quota > 0:
        period = period or DEFAULT_CPU_PERIOD
        if o.cpu_quota > 0:
            quota += _scaled_quota(o.cpu_quota, o.cpu_period, period)
    memory = r.memory_limit + o.memory_limit if r.memory_limit > 0 else r.memory_limit
    swap = r.memory_swap_limit
    if swap > 0 and o.memory_limit > 0:
        swap += o.memory_limit
    shares = r.cpu_shares + o.cpu_shares if r.cpu_shares > 0 else r.cpu_shares
    out = CgroupResources(
        cpu_shares=shares, cpu_quota=quota, cpu_period=period, cpuset_cpus=r.cpuset_cpus,
        cpuset_mems=r.cpuset_mems, memory_limit=memory, memory_swap_limit=swap,
        hugepage_limits=dict(r.hugepage_limits), unified=dict(r.unified))
    return None if out == CgroupResources() else out


def check_pod_resources(r: CgroupResources | None, cgroup_v2: bool) -> None:
    """InvalidArgument for pod cgroup limits this host cannot apply."""
    if r is None:
        return
    cgroups.check_resources(r)
    if r.unified and not cgroup_v2:
        raise InvalidArgument(f"unified cgroup keys {sorted(r.unified)} need cgroup v2; "
                              "this host uses cgroup v1")
    if cgroup_v2:
        cgroups.swap_v2(r.memory_swap_limit, r.memory_limit)


# ------------------------------------------------------------------ plan


def plan(req: api_pb2.RunPodSandboxRequest, cfg: Config, *, cgroup_v2: bool) -> SandboxPlan:
    """Check the whole request; InvalidArgument naming the first bad value."""
    if not req.HasField("config"):
        raise InvalidArgument("RunPodSandbox needs a config")
    config = req.config
    if not config.HasField("metadata"):
        raise InvalidArgument("pod sandbox config has no metadata")
    meta = config.metadata
    _check_meta(meta)
    handler = req.runtime_handler or cfg.runtime.default_handler
    if handler not in cfg.runtime.handlers:
        raise InvalidArgument(
            f"runtime handler {req.runtime_handler!r} is not configured (known: "
            f"{', '.join(sorted(cfg.runtime.handlers))})")
    if config.log_directory and (not posixpath.isabs(config.log_directory)
                                 or "\0" in config.log_directory):
        raise InvalidArgument(
            f"log_directory {config.log_directory!r} is not an absolute path")
    linux = config.linux
    opts = linux.security_context.namespace_options
    host_network, host_ipc, host_pid, shared_pid = _namespace_modes(opts)
    if config.hostname:
        podfiles.validate_hostname(config.hostname)
    dns = DnsConfig.from_cri(config.dns_config) if config.HasField("dns_config") else None
    if dns is not None and not dns.empty:
        podfiles.validate_dns(dns)
    checked = sysctls.validate(dict(linux.sysctls), host_network=host_network,
                               host_ipc=host_ipc)
    driver = CgroupDriver(cfg.runtime.cgroup_driver)
    parent = cgroups.validate_cgroup_parent(linux.cgroup_parent, driver)
    resources = pod_resources(linux.resources if linux.HasField("resources") else None,
                              linux.overhead if linux.HasField("overhead") else None)
    check_pod_resources(resources, cgroup_v2)
    return SandboxPlan(
        name=meta.name, namespace=meta.namespace, uid=meta.uid, attempt=meta.attempt,
        handler=handler, host_network=host_network, host_ipc=host_ipc, host_pid=host_pid,
        shared_pid=shared_pid, hostname=config.hostname, dns=dns, sysctls=tuple(checked),
        cgroup_parent=parent, ports=port_mappings(list(config.port_mappings)),
        resources=resources, log_directory=config.log_directory)


def split_sysctls(items: tuple[Sysctl, ...]) -> tuple[list[Sysctl], list[Sysctl]]:
    """(written when the namespaces are made, written after CNI ADD).

    A per-interface network sysctl (``net.ipv4.conf.eth0.rp_filter``) can only
    be written once CNI has created the interface; ``all``/``default`` and
    everything else go in first, so interfaces CNI creates inherit them.
    """
    early, late = [], []
    for s in items:
        parts = s.name.split(".")
        if (len(parts) > 4 and parts[0] == "net" and parts[1] in ("ipv4", "ipv6")
                and parts[2] in ("conf", "neigh") and parts[3] not in ("all", "default", "lo")):
            late.append(s)
        else:
            early.append(s)
    return early, late
