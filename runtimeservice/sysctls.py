"""Pod sysctls: which are namespaced, in which namespace each one applies.

The CRI hands the runtime a map of sysctl name -> value for the whole pod. Only
sysctls that live in a namespace the pod owns can be applied: writing any other
one would change the node. The rules follow runc's validator and the kubelet's
namespace table:

- IPC namespace: ``kernel.shm*``, ``kernel.msg*``, ``kernel.sem*`` and
  ``fs.mqueue.*``;
- network namespace: ``net.*``;
- UTS namespace: ``kernel.domainname`` (``kernel.hostname`` is refused: the
  pod's hostname field sets it).

A sysctl whose namespace is the host's (host network, host IPC) is refused, and
so is anything not namespaced at all.

Names may use ``/`` as the separator (``net/ipv4/conf/eth0.100/forwarding``),
as Kubernetes allows; they are normalised to the dotted form in which a literal
dot of a component is written as ``/`` (``net.ipv4.conf.eth0/100.forwarding``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from cri.errors import InvalidArgument

_IPC_PREFIXES = ("kernel.shm", "kernel.msg", "kernel.sem", "fs.mqueue.")
_MAX_NAME = 512
_MAX_VALUE = 4096


class SysctlNamespace(StrEnum):
    """The namespace a sysctl is written in."""

    NET = "net"
    IPC = "ipc"
    UTS = "uts"


@dataclass(frozen=True)
class Sysctl:
    """One validated sysctl: dotted name, value and the namespace it belongs to."""

    name: str
    value: str
    namespace: SysctlNamespace

    @property
    def proc_path(self) -> str:
        """The path under /proc/sys, e.g. ``net/ipv4/conf/eth0.100/forwarding``."""
        return self.name.translate(_SWAP)


_SWAP = str.maketrans({".": "/", "/": "."})


def normalize_name(name: str) -> str:
    """The dotted form of a sysctl name given with ``.`` or ``/`` separators.

    As in the kubelet: when the first separator is ``/``, every ``/`` becomes a
    ``.`` and every ``.`` becomes a ``/``.
    """
    first_dot, first_slash = name.find("."), name.find("/")
    if first_slash != -1 and (first_dot == -1 or first_slash < first_dot):
        return name.translate(_SWAP)
    return name


def namespace_of(name: str) -> SysctlNamespace | None:
    """The namespace a (normalised) sysctl lives in, or None if it is node-wide."""
    if name.startswith("net."):
        return SysctlNamespace.NET
    if name.startswith(_IPC_PREFIXES):
        return SysctlNamespace.IPC
    if name == "kernel.domainname":
        return SysctlNamespace.UTS
    return None


def _check_name(raw: str, name: str) -> None:
    if not name or len(name) > _MAX_NAME:
        raise InvalidArgument(f"sysctl name {raw!r} is empty or too long")
    for part in name.split("."):
        # After normalisation a component may hold '/' (a literal dot), never
        # an empty piece, '..' or whitespace: the name becomes a /proc/sys path.
        pieces = part.split("/")
        if not part or any(p in ("", ".", "..") for p in pieces):
            raise InvalidArgument(f"sysctl name {raw!r} has an empty or relative component")
        if any(c.isspace() or c == "\0" for c in part):
            raise InvalidArgument(f"sysctl name {raw!r} contains whitespace or NUL")


def validate(
    sysctls: Mapping[str, str],
    *,
    host_network: bool = False,
    host_ipc: bool = False,
    host_uts: bool | None = None,
) -> list[Sysctl]:
    """Check a pod's sysctls and say where each one is applied.

    `host_uts` defaults to `host_network` (a host-network pod shares the node's
    hostname). Raises InvalidArgument naming the first sysctl that cannot be
    applied. The result is sorted by name, so the order of writes is stable.
    """
    if host_uts is None:
        host_uts = host_network
    out: dict[str, Sysctl] = {}
    for raw, value in sysctls.items():
        name = normalize_name(raw)
        _check_name(raw, name)
        if "\0" in value or len(value) > _MAX_VALUE:
            raise InvalidArgument(f"sysctl {raw!r} has an invalid value {value[:64]!r}")
        if name == "kernel.hostname":
            raise InvalidArgument(
                f"sysctl {raw!r} is not allowed: it conflicts with the pod's hostname field")
        ns = namespace_of(name)
        if ns is None:
            raise InvalidArgument(
                f"sysctl {raw!r} is not namespaced: it would change the node, not the pod")
        if ns is SysctlNamespace.NET and host_network:
            raise InvalidArgument(
                f"sysctl {raw!r} is not allowed: the pod uses the host's network namespace")
        if ns is SysctlNamespace.IPC and host_ipc:
            raise InvalidArgument(
                f"sysctl {raw!r} is not allowed: the pod uses the host's IPC namespace")
        if ns is SysctlNamespace.UTS and host_uts:
            raise InvalidArgument(
                f"sysctl {raw!r} is not allowed: the pod uses the host's UTS namespace")
        if name in out and out[name].value != value:
            raise InvalidArgument(f"sysctl {raw!r} is given twice with different values")
        out[name] = Sysctl(name=name, value=value, namespace=ns)
    return [out[k] for k in sorted(out)]


def by_namespace(sysctls: list[Sysctl]) -> dict[SysctlNamespace, list[Sysctl]]:
    """Group validated sysctls by the namespace they are written in."""
    grouped: dict[SysctlNamespace, list[Sysctl]] = {}
    for s in sysctls:
        grouped.setdefault(s.namespace, []).append(s)
    return grouped
