"""Pod networking through CNI plugins (spec 0.3.x - 1.0.0), the way libcni runs them.

`load_network_config` picks the lexically first valid file in the conf dir
(``.conflist``, or a ``.conf``/``.json`` single-plugin config wrapped into a
list). `PodNetwork` runs it for a sandbox:

- ADD: ``lo`` brought up (crib's job, done in-process over netlink, as CRI-O
  does: no loopback plugin, whatever the conflist), then every plugin of the
  network in order, each getting the previous one's result as ``prevResult``;
  the final result is the pod's IPs, interfaces, routes and DNS. A failed ADD
  is rolled back with a DEL, so it leaves no IP or veth behind.
- DEL: every plugin in reverse order with the cached ADD result; retried a few
  times; an empty ``CNI_NETNS`` when the namespace is already gone; idempotent.
- CHECK: every plugin with the cached result (spec >= 0.4.0, unless
  ``disableCheck``).

Like libcni, each attachment's config, arguments and result are cached on disk
(``<cache_dir>/results/<network>-<container>-<ifname>``, libcni's cniCacheV1
layout), so DEL uses the config the pod was set up with even if the conf dir
changed since. Capability arguments (``portMappings``, ``dns``) reach a plugin
in ``runtimeConfig`` only when it declares that capability.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cri import tracing
from cri.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument
from cri.fsutil import atomic_write
from runtimeservice import namespaces, netlink
from runtimeservice.podfiles import DnsConfig

log = logging.getLogger(__name__)

CONF_EXTENSIONS = (".conf", ".conflist", ".json")
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
CODE_TRY_AGAIN = 11
DEFAULT_SUBNET = "10.89.0.0/16"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# ------------------------------------------------------------------ config


@dataclass(frozen=True)
class NetworkConfig:
    """A network configuration list, as plugins will see it."""

    name: str
    cni_version: str
    plugins: tuple[Mapping[str, Any], ...]
    disable_check: bool = False
    source: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps({"cniVersion": self.cni_version, "name": self.name,
                           "disableCheck": self.disable_check,
                           "plugins": [dict(p) for p in self.plugins]}).encode()


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")) if re.fullmatch(r"\d+\.\d+\.\d+", v) else (-1,)


def parse_network_config(data: bytes | str | Mapping[str, Any], source: str = "",
                         single: bool | None = None) -> NetworkConfig:
    """Parse a conflist (or, with `single` or no ``plugins`` key, a single-plugin conf)."""
    try:
        obj = json.loads(data) if isinstance(data, bytes | str) else dict(data)
    except ValueError as exc:
        raise InvalidArgument(f"CNI config {source}: invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"CNI config {source}: not a JSON object")
    if single is None:
        single = "plugins" not in obj
    version = obj.get("cniVersion")
    if version is None and isinstance(obj.get("cniVersions"), list):
        ours = [v for v in obj["cniVersions"] if v in SUPPORTED_VERSIONS]
        version = max(ours, key=_version_key) if ours else None
    version = version or "0.1.0"
    if version not in SUPPORTED_VERSIONS:
        raise InvalidArgument(f"CNI config {source}: unsupported cniVersion {version!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise InvalidArgument(f"CNI config {source}: missing or invalid network name {name!r}")
    plugins = [obj] if single else obj.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise InvalidArgument(f"CNI config {source}: no plugins")
    for p in plugins:
        t = p.get("type") if isinstance(p, dict) else None
        if not isinstance(t, str) or not t or "/" in t or t.startswith("."):
            raise InvalidArgument(f"CNI config {source}: a plugin has an invalid type {t!r}")
    if single:
        plugins = [{k: v for k, v in obj.items() if k not in ("cniVersion", "name")}]
    return NetworkConfig(name=name, cni_version=version, plugins=tuple(plugins),
                         disable_check=bool(obj.get("disableCheck", False)), source=source)


def load_network_config(conf_dir: Path) -> NetworkConfig | None:
    """The lexically first valid network config in `conf_dir`, or None."""
    try:
        files = sorted(p for p in conf_dir.iterdir()
                       if p.suffix in CONF_EXTENSIONS and p.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return None
    for path in files:
        try:
            single = None if path.suffix != ".conflist" else False
            return parse_network_config(path.read_bytes(), str(path), single)
        except (InvalidArgument, OSError) as exc:
            log.warning("skipping CNI config %s: %s", path, exc)
    return None


def default_conflist(subnet: str = DEFAULT_SUBNET, bridge: str = "crib0", *,
                     data_dir: Path = Path("/var/lib/crib/cni/networks"),
                     name: str = "crib") -> dict[str, Any]:
    """crib's built-in network: a bridge with host-local IPAM, masquerade and portmap."""
    try:
        net = ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        raise InvalidArgument(f"invalid pod subnet {subnet!r}") from None
    if not 0 < len(bridge) <= 15 or "/" in bridge or bridge.strip() != bridge:
        raise InvalidArgument(f"invalid bridge name {bridge!r}")
    default_route = "0.0.0.0/0" if net.version == 4 else "::/0"
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": True,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": str(net)}]],
                      "routes": [{"dst": default_route}], "dataDir": str(data_dir)}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class CniInterface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class CniIP:
    address: str  # CIDR form, e.g. 10.89.0.5/16
    gateway: str = ""
    interface: int | None = None

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)


@dataclass(frozen=True)
class CniRoute:
    dst: str
    gw: str = ""


@dataclass(frozen=True)
class CniResult:
    cni_version: str
    interfaces: tuple[CniInterface, ...] = ()
    ips: tuple[CniIP, ...] = ()
    routes: tuple[CniRoute, ...] = ()
    dns: Mapping[str, Any] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict)

    def pod_ips(self) -> list[str]:
        """IPs on interfaces inside the sandbox (all IPs when none names its interface)."""
        out = []
        for ip in self.ips:
            iface = (self.interfaces[ip.interface] if ip.interface is not None
                     and 0 <= ip.interface < len(self.interfaces) else None)
            if iface is None or iface.sandbox:
                out.append(ip.ip)
        return out


def convert_result(raw: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """A plugin result in the shape of `to_version` (0.2.0-style, 0.3/0.4 or 1.0)."""
    res = dict(raw)
    if "ip4" in res or "ip6" in res:  # 0.1.0/0.2.0: one IP per family, no interfaces
        ips: list[dict[str, Any]] = []
        routes: list[Any] = []
        for fam in ("ip4", "ip6"):
            info = res.pop(fam, None) or {}
            if info.get("ip"):
                ips.append({"version": fam[-1], "address": info["ip"],
                            **({"gateway": info["gateway"]} if info.get("gateway") else {})})
            routes.extend(info.get("routes") or [])
        res.update(ips=ips, routes=routes)
    ips = [dict(ip) for ip in res.get("ips") or []]
    for ip in ips:
        if _version_key(to_version) >= (1, 0, 0):
            ip.pop("version", None)
        else:
            ip.setdefault("version", str(ipaddress.ip_interface(ip["address"]).version))
    res["ips"] = ips
    res["cniVersion"] = to_version
    return res


def parse_result(raw: Mapping[str, Any]) -> CniResult:
    try:
        return CniResult(
            cni_version=str(raw.get("cniVersion", "")),
            interfaces=tuple(CniInterface(i["name"], i.get("mac", ""), i.get("sandbox", ""))
                             for i in raw.get("interfaces") or []),
            ips=tuple(CniIP(str(ipaddress.ip_interface(i["address"])), i.get("gateway", ""),
                            i.get("interface")) for i in raw.get("ips") or []),
            routes=tuple(CniRoute(r["dst"], r.get("gw", "")) for r in raw.get("routes") or []),
            dns=dict(raw.get("dns") or {}),
            raw=dict(raw),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Internal(f"CNI plugin returned an invalid result ({exc}): {raw}") from None


# ------------------------------------------------------------------ errors


class CniError(Internal):
    """A plugin failed; carries the CNI error code, message and details."""

    def __init__(self, network: str, plugin: str, command: str, code: int, msg: str,
                 details: str = "") -> None:
        text = f"CNI network {network!r}: plugin {plugin} {command} failed: {msg}"
        if details:
            text += f" ({details})"
        super().__init__(f"{text} [code {code}]")
        self.network, self.plugin, self.command = network, plugin, command
        self.cni_code, self.msg, self.details = code, msg, details


def _plugin_error(net: str, plugin: str, command: str, rc: int, out: bytes,
                  err: bytes) -> CniError:
    for stream in (out, err):
        with contextlib.suppress(ValueError):
            obj = json.loads(stream)
            if isinstance(obj, dict) and "msg" in obj:
                return CniError(net, plugin, command, int(obj.get("code", 0) or 0),
                                str(obj["msg"]), str(obj.get("details", "") or ""))
    text = (err or out).decode(errors="replace").strip()[-1000:]
    return CniError(net, plugin, command, 0, text or f"exit status {rc}")


# ------------------------------------------------------------------ pod network


@dataclass(frozen=True)
class PortMapping:
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""

    def to_cni(self) -> dict[str, Any]:
        return {"hostPort": self.host_port, "containerPort": self.container_port,
                "protocol": self.protocol.lower(), "hostIP": self.host_ip}


@dataclass(frozen=True)
class PodRef:
    """Who the attachment is for: the kubelet's pod identity."""

    namespace: str
    name: str
    uid: str


def _cni_args(pod: PodRef, container_id: str) -> list[list[str]]:
    args = [["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", pod.namespace],
            ["K8S_POD_NAME", pod.name], ["K8S_POD_INFRA_CONTAINER_ID", container_id],
            ["K8S_POD_UID", pod.uid]]
    for k, v in args:
        if ";" in v or "=" in v or "\0" in v:
            raise InvalidArgument(f"{k} value {v!r} cannot be passed in CNI_ARGS")
    return args


def _capability_args(ports: Sequence[PortMapping], dns: DnsConfig | None) -> dict[str, Any]:
    caps: dict[str, Any] = {}
    if ports:
        caps["portMappings"] = [p.to_cni() for p in ports]
    if dns is not None and not dns.empty:
        caps["dns"] = {"servers": list(dns.servers), "searches": list(dns.searches),
                       "options": list(dns.options)}
    return caps


def _usable_netns(path: Path) -> bool:
    if str(path).startswith("/proc/"):
        return path.exists()
    return namespaces.is_pinned(path)


@dataclass(frozen=True)
class _Attachment:
    net: NetworkConfig
    container_id: str
    ifname: str
    netns: str
    args: list[list[str]]
    caps: Mapping[str, Any]


class PodNetwork:
    """Runs the configured CNI network (or the built-in one) for sandboxes."""

    def __init__(self, conf_dir: Path, plugin_dirs: Sequence[Path], cache_dir: Path, *,
                 default: NetworkConfig | None = None, timeout: float = 60.0,
                 del_attempts: int = 3) -> None:
        self.conf_dir = Path(conf_dir)
        self.plugin_dirs = [Path(d) for d in plugin_dirs]
        self.cache_dir = Path(cache_dir)
        self.default = default
        self.timeout = timeout
        self.del_attempts = del_attempts

    # -- config and plugins

    async def network(self) -> NetworkConfig:
        """The network config in use now; FailedPrecondition when there is none."""
        found = await asyncio.to_thread(load_network_config, self.conf_dir)
        if found is None:
            found = self.default
        if found is None:
            raise FailedPrecondition(f"no valid CNI network config in {self.conf_dir}")
        return found

    def find_plugin(self, plugin_type: str) -> Path:
        for d in self.plugin_dirs:
            p = d / plugin_type
            if os.access(p, os.X_OK) and p.is_file():
                return p
        raise FailedPrecondition(f"CNI plugin {plugin_type!r} not found in "
                                 f"{':'.join(map(str, self.plugin_dirs))}")

    def _env(self, command: str, att: _Attachment) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        path = env.get("PATH", "")
        for extra in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):  # plugins run iptables
            if extra not in path.split(":"):
                path = f"{path}:{extra}" if path else extra
        env.update(PATH=path, CNI_COMMAND=command, CNI_CONTAINERID=att.container_id,
                   CNI_NETNS=att.netns, CNI_IFNAME=att.ifname,
                   CNI_ARGS=";".join(f"{k}={v}" for k, v in att.args),
                   CNI_PATH=":".join(map(str, self.plugin_dirs)))
        return env

    async def _exec(self, command: str, att: _Attachment, plugin: Mapping[str, Any],
                    prev: Mapping[str, Any] | None) -> dict[str, Any] | None:
        conf = dict(plugin)
        conf["name"], conf["cniVersion"] = att.net.name, att.net.cni_version
        if prev is not None:
            conf["prevResult"] = convert_result(prev, att.net.cni_version)
        declared = plugin.get("capabilities") or {}
        runtime = {k: v for k, v in att.caps.items() if declared.get(k)}
        if runtime:
            conf["runtimeConfig"] = runtime
        ptype = str(plugin["type"])
        exe = self.find_plugin(ptype)
        with tracing.child_span(f"cni.{command.lower()}", **{
                "cni.plugin": ptype, "cni.network": att.net.name, "cni.ifname": att.ifname}):
            proc = await asyncio.create_subprocess_exec(
                str(exe), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self._env(command, att), cwd="/")
            try:
                out, err = await asyncio.wait_for(
                    proc.communicate(json.dumps(conf).encode()), self.timeout)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                if isinstance(exc, TimeoutError):
                    raise DeadlineExceeded(
                        f"CNI plugin {ptype} {command} for {att.container_id} "
                        f"did not finish within {self.timeout:g}s") from None
                raise
        if err.strip():
            log.debug("CNI %s %s stderr: %s", ptype, command, err.decode(errors="replace"))
        if proc.returncode != 0:
            raise _plugin_error(att.net.name, ptype, command, proc.returncode or 0, out, err)
        if command != "ADD" or not out.strip():
            return None
        try:
            result = json.loads(out)
        except ValueError:
            raise Internal(f"CNI plugin {ptype} ADD printed invalid JSON: "
                           f"{out[:500].decode(errors='replace')}") from None
        return dict(result)

    # -- cache

    def _cache_path(self, net_name: str, container_id: str, ifname: str) -> Path:
        return self.cache_dir / "results" / f"{net_name}-{container_id}-{ifname}"

    def _save(self, att: _Attachment, result: Mapping[str, Any] | None) -> None:
        entry = {"kind": "cniCacheV1", "containerId": att.container_id,
                 "config": base64.b64encode(att.net.to_bytes()).decode(),
                 "ifName": att.ifname, "networkName": att.net.name, "netns": att.netns,
                 "cniArgs": att.args, "capabilityArgs": dict(att.caps)}
        if result is not None:
            entry["result"] = dict(result)
        atomic_write(self._cache_path(att.net.name, att.container_id, att.ifname),
                     json.dumps(entry).encode(), mode=0o600, durable=True)

    def _load_cached(self, container_id: str, ifname: str) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for path in (self.cache_dir / "results").glob(f"*-{container_id}-{ifname}"):
            try:
                entry = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            if entry.get("containerId") == container_id and entry.get("ifName") == ifname:
                found.append((path, entry))
        return found

    def cached_result(self, container_id: str, ifname: str = "eth0") -> CniResult | None:
        """The cached ADD result of an attachment (e.g. to restore pod IPs after restart)."""
        for _path, entry in self._load_cached(container_id, ifname):
            if entry.get("result"):
                return parse_result(entry["result"])
        return None

    # -- operations

    def _attachment(self, net: NetworkConfig, container_id: str, ifname: str, netns: str,
                    pod: PodRef, ports: Sequence[PortMapping] = (),
                    dns: DnsConfig | None = None) -> _Attachment:
        if not _ID_RE.match(container_id):
            raise InvalidArgument(f"invalid container id {container_id!r} for CNI")
        if not 0 < len(ifname) <= 15 or any(c in ifname for c in "/: \t\n") or ifname in (
                ".", ".."):
            raise InvalidArgument(f"invalid interface name {ifname!r}")
        return _Attachment(net, container_id, ifname, netns, _cni_args(pod, container_id),
                           _capability_args(ports, dns))

    async def _add(self, att: _Attachment) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in att.net.plugins:
            out = await self._exec("ADD", att, plugin, prev)
            if out is not None:
                prev = out
        return convert_result(prev or {}, att.net.cni_version)

    async def add(self, netns: Path, container_id: str, pod: PodRef, *, ifname: str = "eth0",
                  port_mappings: Sequence[PortMapping] = (),
                  dns: DnsConfig | None = None) -> CniResult:
        """Attach the pod's network namespace; returns the pod's addresses.

        Undo with `delete` (also safe when ADD failed half-way: it is rolled
        back here already).
        """
        net = await self.network()
        att = self._attachment(net, container_id, ifname, str(netns), pod, port_mappings, dns)
        await netlink.loopback_up(netns)
        await asyncio.to_thread(self._save, att, None)
        try:
            raw = await self._add(att)
            result = parse_result(raw)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._delete_once(att, None))
                await asyncio.to_thread(self._forget, att)
            raise
        await asyncio.to_thread(self._save, att, raw)
        log.info("CNI ADD %s on network %s: %s", container_id, net.name, result.pod_ips())
        return result

    async def _delete_once(self, att: _Attachment, prev: Mapping[str, Any] | None) -> None:
        if _version_key(att.net.cni_version) < (0, 4, 0):
            prev = None  # prevResult on DEL came with spec 0.4.0
        first: BaseException | None = None
        for plugin in reversed(att.net.plugins):
            try:
                await self._exec("DEL", att, plugin, prev)
            except (CniError, DeadlineExceeded) as exc:
                first = first or exc
                log.warning("%s", exc)
        if first is not None:
            raise first

    def _forget(self, att: _Attachment) -> None:
        self._cache_path(att.net.name, att.container_id, att.ifname).unlink(missing_ok=True)

    async def delete(self, netns: Path | None, container_id: str, pod: PodRef, *,
                     ifname: str = "eth0") -> None:
        """Detach the pod; idempotent, retried, fine when `netns` no longer exists.

        Call it before unpinning the namespace: some plugins find what to undo
        inside it (the bridge plugin 1.1.x reads the pod IPs there to remove its
        ipMasq rules). With the namespace gone, IPAM and portmap are still undone.
        """
        # A namespace that is gone (or a pin file no longer mounted) is passed as
        # "": plugins then release what lives outside it (IPAM, iptables).
        ns = str(netns) if netns is not None and _usable_netns(Path(netns)) else ""
        cached = await asyncio.to_thread(self._load_cached, container_id, ifname)
        targets: list[tuple[_Attachment, Mapping[str, Any] | None, Path | None]] = []
        for cache_file, entry in cached:
            net = parse_network_config(base64.b64decode(entry["config"]), str(cache_file))
            att = replace(self._attachment(net, container_id, ifname, ns, pod),
                          caps=entry.get("capabilityArgs") or {})
            targets.append((att, entry.get("result"), cache_file))
        if not targets:
            try:
                net = await self.network()
            except FailedPrecondition:
                log.info("CNI DEL %s: no cached attachment and no network config", container_id)
                return
            targets.append((self._attachment(net, container_id, ifname, ns, pod), None, None))
        for att, prev, path in targets:
            for attempt in range(1, self.del_attempts + 1):
                try:
                    await self._delete_once(att, prev)
                    break
                except (CniError, DeadlineExceeded):
                    if attempt == self.del_attempts:
                        raise
                    await asyncio.sleep(0.2 * attempt)
            if path is not None:
                await asyncio.to_thread(path.unlink, True)
        log.info("CNI DEL %s done", container_id)

    async def check(self, netns: Path, container_id: str, pod: PodRef, *,
                    ifname: str = "eth0") -> None:
        """Ask every plugin whether the attachment is still as ADD left it."""
        cached = await asyncio.to_thread(self._load_cached, container_id, ifname)
        if not cached or not cached[0][1].get("result"):
            raise FailedPrecondition(f"no CNI attachment of {container_id} on {ifname}")
        cache_file, entry = cached[0]
        net = parse_network_config(base64.b64decode(entry["config"]), str(cache_file))
        if net.disable_check or _version_key(net.cni_version) < (0, 4, 0):
            return
        att = replace(self._attachment(net, container_id, ifname, str(netns), pod),
                      caps=entry.get("capabilityArgs") or {})
        for plugin in net.plugins:
            await self._exec("CHECK", att, plugin, entry["result"])
