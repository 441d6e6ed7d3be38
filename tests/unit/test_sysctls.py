"""Pod sysctl validation: namespaced or refused, and where each one is written."""

from __future__ import annotations

import pytest

from cri.errors import InvalidArgument
from runtimeservice.sysctls import Sysctl, SysctlNamespace, by_namespace, normalize_name, validate


def test_normalize_slash_separated_names() -> None:
    assert normalize_name("net/ipv4/ip_forward") == "net.ipv4.ip_forward"
    # A literal dot (a VLAN interface) survives as '/' in the dotted form.
    assert normalize_name("net/ipv4/conf/eth0.100/forwarding") == \
        "net.ipv4.conf.eth0/100.forwarding"
    assert normalize_name("net.ipv4.conf.eth0/100.forwarding") == \
        "net.ipv4.conf.eth0/100.forwarding"


def test_proc_path_swaps_separators_back() -> None:
    s = Sysctl("net.ipv4.conf.eth0/100.forwarding", "1", SysctlNamespace.NET)
    assert s.proc_path == "net/ipv4/conf/eth0.100/forwarding"


@pytest.mark.parametrize(("name", "ns"), [
    ("net.ipv4.ip_unprivileged_port_start", SysctlNamespace.NET),
    ("net.core.somaxconn", SysctlNamespace.NET),
    ("kernel.shmmax", SysctlNamespace.IPC),
    ("kernel.shm_rmid_forced", SysctlNamespace.IPC),
    ("kernel.msgmnb", SysctlNamespace.IPC),
    ("kernel.sem", SysctlNamespace.IPC),
    ("fs.mqueue.msg_max", SysctlNamespace.IPC),
    ("kernel.domainname", SysctlNamespace.UTS),
])
def test_namespaced_sysctls_map_to_their_namespace(name: str, ns: SysctlNamespace) -> None:
    [s] = validate({name: "1"})
    assert s.namespace is ns and s.name == name and s.value == "1"


@pytest.mark.parametrize("name", ["vm.swappiness", "kernel.pid_max", "fs.file-max",
                                  "kernel.panic"])
def test_node_wide_sysctls_are_refused_by_name(name: str) -> None:
    with pytest.raises(InvalidArgument, match=name.replace(".", r"\.")):
        validate({name: "1"})


def test_hostname_sysctl_conflicts_with_hostname_field() -> None:
    with pytest.raises(InvalidArgument, match="hostname"):
        validate({"kernel.hostname": "x"})


def test_host_namespaces_refuse_their_sysctls() -> None:
    with pytest.raises(InvalidArgument, match="host's network"):
        validate({"net.core.somaxconn": "1024"}, host_network=True)
    with pytest.raises(InvalidArgument, match="host's IPC"):
        validate({"kernel.shmmni": "100"}, host_ipc=True)
    with pytest.raises(InvalidArgument, match="host's UTS"):
        validate({"kernel.domainname": "x"}, host_network=True)
    # IPC sysctls are fine with host network, and the reverse.
    assert validate({"kernel.shmmni": "100"}, host_network=True)
    assert validate({"net.core.somaxconn": "1"}, host_ipc=True)


@pytest.mark.parametrize("name", ["net..ipv4", "net/../../etc", "net.ipv4.", "net. x",
                                  "net.a/../b", ""])
def test_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate({name: "1"})


def test_conflicting_spellings_are_refused_and_order_is_stable() -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        validate({"net.ipv4.ip_forward": "1", "net/ipv4/ip_forward": "0"})
    out = validate({"net.b": "1", "kernel.shmmni": "2", "net.a": "3"})
    assert [s.name for s in out] == ["kernel.shmmni", "net.a", "net.b"]
    grouped = by_namespace(out)
    assert [s.name for s in grouped[SysctlNamespace.NET]] == ["net.a", "net.b"]
    assert [s.name for s in grouped[SysctlNamespace.IPC]] == ["kernel.shmmni"]


def test_value_with_nul_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        validate({"net.core.somaxconn": "1\0"})
