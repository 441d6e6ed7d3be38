"""A sandbox's resolv.conf, hostname and hosts files."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cri.errors import InvalidArgument
from runtimeservice import podfiles
from runtimeservice.podfiles import DnsConfig


def test_resolv_conf_from_dns_config(tmp_path: Path) -> None:
    dns = DnsConfig(servers=("10.96.0.10", "fd00::a"),
                    searches=("default.svc.cluster.local", "cluster.local"),
                    options=("ndots:5", "edns0"))
    path = podfiles.write_resolv_conf(tmp_path, dns)
    assert path.read_text() == (
        "nameserver 10.96.0.10\nnameserver fd00::a\n"
        "search default.svc.cluster.local cluster.local\n"
        "options ndots:5 edns0\n")


def test_empty_dns_config_copies_the_host_file(tmp_path: Path) -> None:
    host = tmp_path / "host-resolv.conf"
    host.write_text("nameserver 192.0.2.53\nsearch example.org\n")
    out = tmp_path / "pod"
    out.mkdir()
    for dns in (None, DnsConfig()):
        path = podfiles.write_resolv_conf(out, dns, host_resolv=host)
        assert path.read_text() == host.read_text()


@pytest.mark.parametrize(("dns", "match"), [
    (DnsConfig(servers=("not-an-ip",)), "not-an-ip"),
    (DnsConfig(searches=tuple(f"d{i}.example" for i in range(33))), "33"),
    (DnsConfig(searches=("a" * 254,)), "search domain"),
    (DnsConfig(searches=("bad domain",)), "bad domain"),
    (DnsConfig(searches=("x.example\nnameserver 1.2.3.4",)), "search domain"),
    (DnsConfig(options=("ndots:5\nnameserver 6.6.6.6",)), "option"),
])
def test_invalid_dns_config_is_refused_naming_the_value(dns: DnsConfig, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        podfiles.validate_dns(dns)


def test_search_list_total_length_is_limited() -> None:
    searches = tuple(("a" * 60 + f".d{i}") for i in range(32))  # 32 entries, > 2048 chars
    with pytest.raises(InvalidArgument, match="2048"):
        podfiles.validate_dns(DnsConfig(searches=searches))


def test_hosts_has_localhost_and_pod_ips(tmp_path: Path) -> None:
    path = podfiles.write_hosts(tmp_path, "web-0", ["10.89.0.5", "fd00::5"])
    lines = path.read_text().splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert "::1\tlocalhost ip6-localhost ip6-loopback" in lines
    assert lines[-2:] == ["10.89.0.5\tweb-0", "fd00::5\tweb-0"]
    # Rewritten once the IPs are known; before, only the localhost lines.
    assert "web-0" not in podfiles.write_hosts(tmp_path, "web-0").read_text()


def test_host_network_pod_gets_the_node_hosts_file(tmp_path: Path) -> None:
    node = tmp_path / "node-hosts"
    node.write_text("127.0.0.1 localhost\n192.0.2.7 node1\n")
    out = tmp_path / "pod"
    out.mkdir()
    path = podfiles.write_hosts(out, "node1", host_network=True, host_hosts=node)
    assert path.read_text() == node.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["hosts"]


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "a..b", "a\nb"])
def test_invalid_hostnames_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="hostname"):
        podfiles.validate_hostname(name)


def test_write_pod_files_writes_all_three_atomically(tmp_path: Path) -> None:
    d = tmp_path / "sandbox"
    paths = asyncio.run(podfiles.write_pod_files(
        d, "pod-a", DnsConfig(servers=("10.0.0.10",)), ["10.89.0.9"]))
    assert set(paths) == {"resolv.conf", "hostname", "hosts"}
    assert (d / "hostname").read_text() == "pod-a\n"
    assert (d / "resolv.conf").read_text() == "nameserver 10.0.0.10\n"
    assert "10.89.0.9\tpod-a" in (d / "hosts").read_text()
    assert sorted(p.name for p in d.iterdir()) == ["hostname", "hosts", "resolv.conf"]


def test_invalid_config_writes_nothing(tmp_path: Path) -> None:
    d = tmp_path / "sandbox"
    with pytest.raises(InvalidArgument):
        asyncio.run(podfiles.write_pod_files(d, "ok", DnsConfig(servers=("x",))))
    with pytest.raises(InvalidArgument):
        asyncio.run(podfiles.write_pod_files(d, "not ok", None))
    assert not d.exists()


def test_from_cri_reads_the_proto_fields() -> None:
    from api import api_pb2

    msg = api_pb2.DNSConfig(servers=["1.1.1.1"], searches=["a.b"], options=["ndots:2"])
    assert DnsConfig.from_cri(msg) == DnsConfig(("1.1.1.1",), ("a.b",), ("ndots:2",))
