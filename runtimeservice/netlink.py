"""Netlink queries on pod network namespaces; the only module that uses pyroute2.

pyroute2 is imported lazily (it costs ~250 ms) the first time a query runs.
`loopback_up`, on every RunPodSandbox's path, needs no pyroute2: it sends
one RTM_NEWLINK over a plain netlink socket.
Queries on a pod's namespace run in a fresh thread that has joined it
(`namespaces.run_in_namespaces`), so the netlink socket is created inside
that namespace; pyroute2's own ``netns=`` support forks the caller, which the
threaded daemon must not do.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cri.errors import Internal
from runtimeservice import namespaces
from runtimeservice.namespaces import NamespaceKind

T = TypeVar("T")

_IFF_UP = 0x1
_RTM_NEWLINK = 16
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4
_NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change


@dataclass(frozen=True)
class IfAddress:
    address: str
    prefixlen: int
    family: int  # 4 or 6

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class InterfaceStats:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


async def _run(netns: Path | None, fn: Callable[[Any], T]) -> T:
    def work() -> T:
        ipr = _iproute()
        try:
            return fn(ipr)
        finally:
            ipr.close()

    if netns is None:
        return await asyncio.to_thread(work)
    return await namespaces.run_in_namespaces({NamespaceKind.NET: netns}, work)


def _link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


async def link_exists(name: str, netns: Path | None = None) -> bool:
    """Whether a link called `name` exists (in `netns`, or in the host namespace)."""
    return await _run(netns, lambda ipr: _link_index(ipr, name) is not None)


async def addresses(netns: Path, ifname: str = "eth0",
                    include_link_local: bool = False) -> list[IfAddress]:
    """The addresses of `ifname` inside `netns` (the pod IPs), IPv4 first."""

    def query(ipr: Any) -> list[IfAddress]:
        index = _link_index(ipr, ifname)
        if index is None:
            return []
        out = []
        for msg in ipr.get_addr(index=index):
            addr = msg.get("IFA_ADDRESS") or msg.get("address")
            scope = msg.get("scope", 0)
            if not addr or (scope == 253 and not include_link_local):  # RT_SCOPE_LINK
                continue
            family = 4 if msg["family"] == 2 else 6
            out.append(IfAddress(address=addr, prefixlen=msg["prefixlen"], family=family))
        return sorted(out, key=lambda a: a.family)

    return await _run(netns, query)


def _stats(msg: Any) -> InterfaceStats:
    st = msg.get("IFLA_STATS64") or msg.get("IFLA_STATS") or {}
    return InterfaceStats(
        name=msg.get("IFLA_IFNAME"),
        rx_bytes=int(st.get("rx_bytes", 0)), rx_errors=int(st.get("rx_errors", 0)),
        tx_bytes=int(st.get("tx_bytes", 0)), tx_errors=int(st.get("tx_errors", 0)))


async def interface_stats(netns: Path, ifname: str | None = None) -> list[InterfaceStats]:
    """Byte and error counters of `ifname` (or of every interface but ``lo``) in `netns`."""

    def query(ipr: Any) -> list[InterfaceStats]:
        links = ipr.get_links() if ifname is None else ipr.get_links(ifname=ifname)
        stats = [_stats(m) for m in links]
        return [s for s in stats if ifname is not None or s.name != "lo"]

    try:
        return await _run(netns, query)
    except Exception as exc:  # pyroute2 raises NetlinkError for an unknown ifname
        if ifname is not None and getattr(exc, "code", None) == 19:  # ENODEV
            return []
        raise


def set_link_up(index: int) -> None:
    """Set link `index` up in the calling thread's network namespace (blocking).

    One RTM_NEWLINK request changing only IFF_UP, and its acknowledgement;
    OSError with the kernel's errno when it refuses.
    """
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, _IFF_UP, _IFF_UP)
        sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), _RTM_NEWLINK,
                                 _NLM_F_REQUEST | _NLM_F_ACK, 1, 0) + body)
        while True:
            reply = sock.recv(8192)
            _length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply)
            if kind == _NLMSG_ERROR and seq == 1:
                (error,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
                if error:
                    raise OSError(-error, os.strerror(-error))
                return


async def loopback_up(netns: Path) -> None:
    """Bring ``lo`` up in `netns`: crib's job in every pod, whatever the CNI config.

    As CRI-O does, no loopback plugin runs: an in-process netlink request
    from a thread inside the namespace, with nothing to undo (``lo`` goes
    away with the namespace).
    """

    def up() -> None:
        try:
            set_link_up(socket.if_nametoindex("lo"))
        except OSError as exc:
            raise Internal(f"cannot bring lo up in network namespace {netns}: "
                           f"{exc.strerror or exc}") from None

    await namespaces.run_in_namespaces({NamespaceKind.NET: netns}, up)
