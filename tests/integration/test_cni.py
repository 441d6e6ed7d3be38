"""Pod networking with the real CNI plugins (bridge, host-local, portmap) and crib's ``lo``.

Uses its own bridge (cribtest0) and subnet (10.199.0.0/24), host-local state
and CNI cache in tmp, and checks that DEL leaves no veth, IP or iptables rule.
Traffic goes only to the pod namespaces made here and to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.errors import Internal
from runtimeservice import cni, namespaces, netlink
from runtimeservice.cni import CniError, PodNetwork, PodRef, PortMapping

pytestmark = pytest.mark.integration

BRIDGE = "cribtest0"
SUBNET = ipaddress.ip_network("10.199.0.0/24")
PLUGINS = Path("/usr/lib/cni")
NET_NAME = "cribtest"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def nat_rules() -> str:
    return sh("iptables-save", "-t", "nat")


@pytest.fixture(scope="module", autouse=True)
def host_state() -> Iterator[None]:
    """Put back what the plugins change on the host: the bridge, ip_forward, top chains."""
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    had_chains = "CNI-HOSTPORT-DNAT" in nat_rules()
    yield
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)
    rules = nat_rules()
    if not had_chains and "-A CNI-HOSTPORT-DNAT" not in rules:
        # portmap's shared top-level chains: created by these tests, now empty.
        for rule in ("PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                     "OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                     "POSTROUTING -m comment --comment 'CNI portfwd requiring masquerade' "
                     "-j CNI-HOSTPORT-MASQ"):
            subprocess.run(f"iptables -t nat -D {rule}", shell=True, capture_output=True)
        for chain in ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"):
            subprocess.run(["iptables", "-t", "nat", "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", "nat", "-X", chain], capture_output=True)
    assert BRIDGE not in sh("ip", "-o", "link")
    assert str(SUBNET.network_address)[:-1] not in nat_rules()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns_root = tmp / "ns"
        self.ipam = tmp / "ipam"
        conf = cni.default_conflist(str(SUBNET), BRIDGE, data_dir=self.ipam, name=NET_NAME)
        self.net = PodNetwork(tmp / "net.d", [PLUGINS], tmp / "cache",
                              default=cni.parse_network_config(conf))
        self.pods: list[tuple[namespaces.PodNamespaces, str]] = []

    async def new_pod(self, i: int) -> tuple[namespaces.PodNamespaces, str, PodRef]:
        cid = f"{i:02d}" + "ab" * 31
        pod = await namespaces.create(self.ns_root / cid, hostname=f"pod{i}")
        self.pods.append((pod, cid))
        return pod, cid, PodRef("crib-test", f"pod{i}", f"uid-{i}")

    def allocated(self) -> list[str]:
        d = self.ipam / NET_NAME
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.exists() else []


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    for pod, cid in e.pods:
        asyncio.run(e.net.delete(pod.net, cid, PodRef("crib-test", "x", "x")))
        asyncio.run(namespaces.remove(pod.directory))
    namespaces.release_root(e.ns_root)
    assert e.allocated() == []
    assert sh("ip", "-o", "link", "show", "master", BRIDGE).strip() == "" \
        if BRIDGE in sh("ip", "-o", "link") else True
    assert "10.199.0." not in nat_rules()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LISTENER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(8)
while True:
    c, addr = s.accept()
    c.sendall(("hello " + addr[0]).encode())
    c.close()
"""


def fetch(host: str, port: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((host, port), timeout=2) as c:
                return c.recv(100).decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_add_reach_portmap_and_delete(env: Env) -> None:
    host_port = free_port()
    pod, cid, ref = asyncio.run(env.new_pod(1))
    assert pod.net is not None
    result = asyncio.run(env.net.add(pod.net, cid, ref,
                                     port_mappings=[PortMapping(host_port, 8080)]))
    [ip] = result.pod_ips()
    assert ipaddress.ip_address(ip) in SUBNET
    assert env.allocated() == [ip]
    assert [a.address for a in asyncio.run(netlink.addresses(pod.net))] == [ip]
    assert asyncio.run(netlink.link_exists("lo", pod.net))
    assert "UP" in sh("nsenter", f"--net={pod.net}", "ip", "-br", "link", "show", "lo")
    veth = next(i.name for i in result.interfaces if i.name.startswith("veth"))
    assert asyncio.run(netlink.link_exists(veth))

    listener = subprocess.Popen(["nsenter", f"--net={pod.net}", sys.executable, "-c", LISTENER])
    try:
        assert fetch(ip, 8080).startswith("hello 10.199.0.1")  # host via the bridge
        # hostPort on 127.0.0.1: portmap DNATs locally originated traffic and sets
        # route_localnet on the bridge, masquerading 127.0.0.1 to the bridge address.
        assert fetch("127.0.0.1", host_port).startswith("hello 10.199.0.1")
        stats = asyncio.run(netlink.interface_stats(pod.net, "eth0"))
        assert stats[0].rx_bytes > 0 and stats[0].tx_bytes > 0
    finally:
        listener.kill()
        listener.wait()
    assert cid[:12] in nat_rules() or ip in nat_rules()

    asyncio.run(env.net.delete(pod.net, cid, ref))
    assert env.allocated() == []
    assert not asyncio.run(netlink.link_exists(veth))
    assert ip not in nat_rules()
    assert asyncio.run(netlink.addresses(pod.net)) == []
    asyncio.run(env.net.delete(pod.net, cid, ref))  # idempotent


def test_delete_after_the_namespace_is_gone(env: Env) -> None:
    """DEL with the pin already removed: an empty CNI_NETNS, IPAM and portmap still undone.

    The network has no ipMasq here: the bridge plugin (1.1.x) finds the IPs to
    unmasquerade inside the namespace, so that one rule needs the namespace and
    crib deletes networking before unpinning.
    """
    conf = cni.default_conflist(str(SUBNET), BRIDGE, data_dir=env.ipam, name=NET_NAME)
    conf["plugins"][0]["ipMasq"] = False
    env.net.default = cni.parse_network_config(conf)
    pod, cid, ref = asyncio.run(env.new_pod(2))
    assert pod.net is not None
    result = asyncio.run(env.net.add(pod.net, cid, ref, port_mappings=[
        PortMapping(free_port(), 80)]))
    assert result.pod_ips()[0] in nat_rules()  # the DNAT rule
    veth = next(i.name for i in result.interfaces if i.name.startswith("veth"))
    asyncio.run(namespaces.remove(pod.directory))
    asyncio.run(env.net.delete(pod.net, cid, ref))
    assert env.allocated() == []
    assert "10.199.0." not in nat_rules()
    assert not asyncio.run(netlink.link_exists(veth))


def test_concurrent_adds_get_distinct_ips(env: Env) -> None:
    async def run() -> list[str]:
        pods = [await env.new_pod(10 + i) for i in range(20)]
        results = await asyncio.gather(*(env.net.add(p.net, cid, ref)  # type: ignore[arg-type]
                                         for p, cid, ref in pods))
        ips = [r.pod_ips()[0] for r in results]
        await asyncio.gather(*(env.net.delete(p.net, cid, ref) for p, cid, ref in pods))
        return ips

    ips = asyncio.run(run())
    assert len(set(ips)) == 20
    assert all(ipaddress.ip_address(ip) in SUBNET for ip in ips)
    assert env.allocated() == []


def test_check_bridge_only_network(env: Env, tmp_path: Path) -> None:
    conf = cni.default_conflist(str(SUBNET), BRIDGE, data_dir=env.ipam, name=NET_NAME)
    conf["plugins"] = conf["plugins"][:1]  # Debian's portmap 1.1.1 fails CHECK without ip6 rules
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    (conf_dir / "10-bridge.conflist").write_text(json.dumps(conf))
    pod, cid, ref = asyncio.run(env.new_pod(3))
    assert pod.net is not None
    asyncio.run(env.net.add(pod.net, cid, ref))
    asyncio.run(env.net.check(pod.net, cid, ref))
    sh("nsenter", f"--net={pod.net}", "ip", "link", "set", "eth0", "address",
       "02:00:00:00:00:99")
    with pytest.raises(CniError):
        asyncio.run(env.net.check(pod.net, cid, ref))


def test_failing_plugin_gives_a_clear_error(env: Env, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    failer = plugins / "failer"
    failer.write_text("#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = DEL ] && exit 0\n"
                      'echo \'{"cniVersion":"1.0.0","code":101,"msg":"no addresses left",'
                      '"details":"pool exhausted"}\'\nexit 1\n')
    failer.chmod(0o755)
    conf_dir = tmp_path / "fail.d"
    conf_dir.mkdir()
    (conf_dir / "10-fail.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "failnet", "plugins": [{"type": "failer"}]}))
    net = PodNetwork(conf_dir, [plugins, PLUGINS], tmp_path / "fail-cache")
    pod, cid, ref = asyncio.run(env.new_pod(4))
    assert pod.net is not None
    with pytest.raises(CniError) as info:
        asyncio.run(net.add(pod.net, cid, ref))
    assert info.value.cni_code == 101
    assert "no addresses left" in info.value.message
    assert "failer" in info.value.message and "pool exhausted" in info.value.message
    assert list((tmp_path / "fail-cache" / "results").iterdir()) == []


def test_lo_is_crib_s_job_whatever_the_plugins(env: Env, tmp_path: Path) -> None:
    """ADD brings lo up with no loopback plugin installed; a refused netlink request is clear."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name in ("bridge", "host-local", "portmap"):  # no loopback
        (plugins / name).symlink_to(PLUGINS / name)
    env.net.plugin_dirs = [plugins]
    pod, cid, ref = asyncio.run(env.new_pod(40))
    assert pod.net is not None
    assert "UP" not in sh("nsenter", f"--net={pod.net}", "ip", "-br", "link", "show", "lo")
    asyncio.run(env.net.add(pod.net, cid, ref))
    assert "UP" in sh("nsenter", f"--net={pod.net}", "ip", "-br", "link", "show", "lo")
    asyncio.run(netlink.loopback_up(pod.net))  # again: fine

    def no_such_link() -> None:
        netlink.set_link_up(99999)

    with pytest.raises(Internal) as err:
        asyncio.run(namespaces.run_in_namespaces({namespaces.NamespaceKind.NET: pod.net},
                                                 no_such_link))
    cause = err.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENODEV  # the kernel's ack
