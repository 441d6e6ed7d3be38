"""A sandbox's /etc files: resolv.conf, hostname and hosts.

The files are written atomically into a directory the caller owns (the
sandbox's run directory); the OCI spec builder bind-mounts them into every
container of the pod. Content is built by pure functions so it can be checked
without touching the disk; the `write_*` functions do blocking I/O and the
`write_pod_files` coroutine runs them off the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cri.errors import InvalidArgument
from cri.fsutil import atomic_write

RESOLV_CONF = "resolv.conf"
HOSTNAME = "hostname"
HOSTS = "hosts"

# The kubelet's limits (pkg/apis/core/validation): search paths and their length.
MAX_SEARCHES = 32
MAX_SEARCH_CHARS = 2048
MAX_DOMAIN_CHARS = 253
MAX_HOSTNAME = 64  # the kernel's limit for sethostname

_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")
_OPTION_RE = re.compile(r"^[A-Za-z0-9_\-:.]+$")

_LOCAL_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "fe00::0\tip6-mcastprefix\n"
    "fe00::1\tip6-allnodes\n"
    "fe00::2\tip6-allrouters\n"
)


@dataclass(frozen=True)
class DnsConfig:
    """The CRI DNSConfig: nameservers, search domains, resolver options."""

    servers: Sequence[str] = field(default_factory=tuple)
    searches: Sequence[str] = field(default_factory=tuple)
    options: Sequence[str] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not (self.servers or self.searches or self.options)

    @classmethod
    def from_cri(cls, msg: object) -> DnsConfig:
        """From an `api_pb2.DNSConfig` (or anything with the same three fields)."""
        return cls(
            servers=tuple(getattr(msg, "servers", ())),
            searches=tuple(getattr(msg, "searches", ())),
            options=tuple(getattr(msg, "options", ())),
        )


def validate_hostname(hostname: str) -> None:
    """Raise InvalidArgument unless `hostname` is an RFC 1123 name the kernel accepts."""
    if len(hostname) > MAX_HOSTNAME or not _HOSTNAME_RE.match(hostname):
        raise InvalidArgument(
            f"invalid hostname {hostname!r}: want an RFC 1123 name of at most "
            f"{MAX_HOSTNAME} characters")


def validate_dns(dns: DnsConfig) -> None:
    """Raise InvalidArgument naming the first bad server, search domain or option."""
    for server in dns.servers:
        try:
            ipaddress.ip_address(server.split("%", 1)[0])
        except ValueError:
            raise InvalidArgument(f"DNS server {server!r} is not an IP address") from None
    if len(dns.searches) > MAX_SEARCHES:
        raise InvalidArgument(
            f"{len(dns.searches)} DNS search domains given, at most {MAX_SEARCHES} allowed")
    if len(" ".join(dns.searches)) > MAX_SEARCH_CHARS:
        raise InvalidArgument(
            f"DNS search list is longer than {MAX_SEARCH_CHARS} characters")
    for domain in dns.searches:
        name = domain.rstrip(".")
        if len(domain) > MAX_DOMAIN_CHARS or not name or not _HOSTNAME_RE.match(name):
            raise InvalidArgument(f"invalid DNS search domain {domain!r}")
    for option in dns.options:
        if not _OPTION_RE.match(option):
            raise InvalidArgument(f"invalid DNS option {option!r}")


def resolv_conf_content(dns: DnsConfig) -> str:
    """resolv.conf text for a validated, non-empty DNS config."""
    lines = [f"nameserver {s}" for s in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n"


def hosts_content(hostname: str, ips: Sequence[str] = ()) -> str:
    """hosts text: the localhost lines, then each pod IP with the hostname."""
    text = "# Kubernetes-managed hosts file (written by crib).\n" + _LOCAL_HOSTS
    for ip in ips:
        text += f"{ipaddress.ip_address(ip)}\t{hostname}\n"
    return text


def write_resolv_conf(
    directory: Path, dns: DnsConfig | None, host_resolv: Path = Path("/etc/resolv.conf")
) -> Path:
    """Write `directory`/resolv.conf; with no DNS config, copy the host's file."""
    path = directory / RESOLV_CONF
    if dns is None or dns.empty:
        try:
            data = host_resolv.read_bytes()
        except FileNotFoundError:
            data = b""
        atomic_write(path, data, durable=False)
        return path
    validate_dns(dns)
    atomic_write(path, resolv_conf_content(dns).encode(), durable=False)
    return path


def write_hostname(directory: Path, hostname: str) -> Path:
    validate_hostname(hostname)
    path = directory / HOSTNAME
    atomic_write(path, f"{hostname}\n".encode(), durable=False)
    return path


def write_hosts(
    directory: Path,
    hostname: str,
    ips: Sequence[str] = (),
    *,
    host_network: bool = False,
    host_hosts: Path = Path("/etc/hosts"),
) -> Path:
    """Write `directory`/hosts; a host-network pod gets a copy of the node's file.

    Call again with the pod IPs once CNI ADD has returned them.
    """
    path = directory / HOSTS
    if host_network:
        tmp = directory / f".{HOSTS}.copy"
        try:
            shutil.copyfile(host_hosts, tmp)
            tmp.replace(path)
        except FileNotFoundError:
            tmp.unlink(missing_ok=True)
            atomic_write(path, hosts_content(hostname).encode(), durable=False)
        return path
    validate_hostname(hostname)
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidArgument(f"pod IP {ip!r} is not an IP address") from None
    atomic_write(path, hosts_content(hostname, ips).encode(), durable=False)
    return path


async def write_pod_files(
    directory: Path,
    hostname: str,
    dns: DnsConfig | None,
    ips: Sequence[str] = (),
    *,
    host_network: bool = False,
) -> dict[str, Path]:
    """Validate, then write resolv.conf, hostname and hosts into `directory`.

    Returns the paths by file name. Validation happens before any write, so an
    invalid config leaves nothing behind.
    """
    validate_hostname(hostname)
    if dns is not None and not dns.empty:
        validate_dns(dns)

    def work() -> dict[str, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        return {
            RESOLV_CONF: write_resolv_conf(directory, dns),
            HOSTNAME: write_hostname(directory, hostname),
            HOSTS: write_hosts(directory, hostname, ips, host_network=host_network),
        }

    return await asyncio.to_thread(work)
