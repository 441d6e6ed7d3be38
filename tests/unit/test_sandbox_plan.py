"""RunPodSandbox validation: the whole request is checked before anything is made."""

from __future__ import annotations

import pytest

from api import api_pb2
from cri.config import Config
from cri.errors import InvalidArgument
from runtimeservice.cgroups import CgroupResources
from runtimeservice.cni import PortMapping
from runtimeservice.namespaces import NamespaceKind
from runtimeservice.sandbox_plan import plan, pod_resources, port_mappings, split_sysctls
from runtimeservice.sysctls import Sysctl, SysctlNamespace

NODE = api_pb2.NamespaceMode.NODE
POD = api_pb2.NamespaceMode.POD
CONTAINER = api_pb2.NamespaceMode.CONTAINER


def request(**linux_opts: int) -> api_pb2.RunPodSandboxRequest:
    return api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web", uid="u-1", namespace="default"),
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(**linux_opts)))))


def check(req: api_pb2.RunPodSandboxRequest, cfg: Config | None = None,
          v2: bool = False) -> object:
    return plan(req, cfg or Config(), cgroup_v2=v2)


def test_defaults_own_every_namespace_and_share_pid() -> None:
    p = plan(request(), Config(), cgroup_v2=False)
    assert p.kinds == (NamespaceKind.NET, NamespaceKind.IPC, NamespaceKind.UTS)
    assert p.shared_pid and not p.host_pid and p.handler == "runc"
    assert p.cgroup_parent == "/crib" and p.resources is None and p.ports == ()
    assert p.hostname_for("ab" * 32) == "abababababab"


def test_host_modes() -> None:
    p = plan(request(network=NODE, ipc=NODE, pid=NODE), Config(), cgroup_v2=False)
    assert p.kinds == () and p.host_network and p.host_ipc and p.host_pid
    assert not p.shared_pid
    p = plan(request(network=NODE, pid=CONTAINER), Config(), cgroup_v2=False)
    assert p.kinds == (NamespaceKind.IPC,) and not p.shared_pid


def _set(req: api_pb2.RunPodSandboxRequest, path: str, value: object) -> None:
    *parents, last = path.split(".")
    obj: object = req.config
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, value)


@pytest.mark.parametrize(("path", "value", "needle"), [
    ("metadata.name", "", "metadata.name"),
    ("metadata.uid", "", "metadata.uid"),
    ("metadata.namespace", "", "metadata.namespace"),
    ("metadata.name", "a;b", "a;b"),
    ("log_directory", "relative/dir", "relative/dir"),
    ("hostname", "Bad_Name", "Bad_Name"),
    ("linux.cgroup_parent", "/a/../b", "/a/../b"),
    ("linux.cgroup_parent", "kubepods.slice", "kubepods.slice"),
    ("linux.security_context.namespace_options.pid", api_pb2.NamespaceMode.TARGET, "TARGET"),
    ("linux.security_context.namespace_options.network", 7, "network"),
])
def test_bad_fields(path: str, value: object, needle: str) -> None:
    req = request()
    _set(req, path, value)
    with pytest.raises(InvalidArgument, match=needle.replace(".", r"\.").replace(";", ";")):
        check(req)


def test_missing_config_and_metadata() -> None:
    with pytest.raises(InvalidArgument, match="config"):
        check(api_pb2.RunPodSandboxRequest())
    req = request()
    req.config.ClearField("metadata")
    with pytest.raises(InvalidArgument, match="metadata"):
        check(req)


def test_unknown_handler_and_user_namespaces() -> None:
    req = request()
    req.runtime_handler = "kata"
    with pytest.raises(InvalidArgument, match="kata"):
        check(req)
    req = request()
    req.config.linux.security_context.namespace_options.userns_options.mode = POD
    with pytest.raises(InvalidArgument, match="user namespaces"):
        check(req)
    req.config.linux.security_context.namespace_options.userns_options.mode = NODE
    check(req)


def test_sysctls_checked_against_the_pod_namespaces() -> None:
    req = request(network=NODE)
    req.config.linux.sysctls["kernel.shm_rmid_forced"] = "1"
    assert [s.name for s in plan(req, Config(), cgroup_v2=False).sysctls] == \
        ["kernel.shm_rmid_forced"]
    req.config.linux.sysctls["net.core.somaxconn"] = "1024"
    with pytest.raises(InvalidArgument, match="host's network"):
        check(req)
    req = request()
    req.config.linux.sysctls["vm.swappiness"] = "1"
    with pytest.raises(InvalidArgument, match="not namespaced"):
        check(req)


def test_dns_checked() -> None:
    req = request()
    req.config.dns_config.servers.append("not-an-ip")
    with pytest.raises(InvalidArgument, match="not-an-ip"):
        check(req)


def test_systemd_driver_parent() -> None:
    cfg = Config()
    cfg.runtime.cgroup_driver = "systemd"
    req = request()
    req.config.linux.cgroup_parent = "kubepods-besteffort.slice"
    assert plan(req, cfg, cgroup_v2=False).cgroup_parent == "kubepods-besteffort.slice"
    req.config.linux.cgroup_parent = "/kubepods"
    with pytest.raises(InvalidArgument, match="/kubepods"):
        check(req, cfg)


def test_port_mappings() -> None:
    P = api_pb2.PortMapping
    got = port_mappings([P(container_port=80, host_port=8080),
                         P(container_port=53, host_port=5353, protocol=api_pb2.Protocol.UDP,
                           host_ip="127.0.0.1"),
                         P(container_port=9090)])  # no host port: not published
    assert got == (PortMapping(8080, 80, "tcp", ""), PortMapping(5353, 53, "udp", "127.0.0.1"))
    for bad, needle in ((P(container_port=80, host_port=70000), "70000"),
                        (P(container_port=80, host_port=1, host_ip="x"), "'x'"),
                        (P(container_port=0, host_port=80), "container_port"),
                        (P(container_port=80, host_port=1, protocol=9), "protocol")):
        with pytest.raises(InvalidArgument, match=needle):
            port_mappings([bad])
    with pytest.raises(InvalidArgument, match="twice"):
        port_mappings([P(container_port=80, host_port=81), P(container_port=82, host_port=81)])


def test_pod_resources_add_the_overhead_only_to_set_limits() -> None:
    R = api_pb2.LinuxContainerResources
    assert pod_resources(None, None) is None
    assert pod_resources(R(), R()) is None
    got = pod_resources(R(memory_limit_in_bytes=100 << 20, cpu_quota=50_000, cpu_period=100_000,
                          cpu_shares=512),
                        R(memory_limit_in_bytes=10 << 20, cpu_quota=5_000, cpu_period=50_000,
                          cpu_shares=10))
    assert got == CgroupResources(memory_limit=110 << 20, cpu_quota=60_000, cpu_period=100_000,
                                  cpu_shares=522)
    # The overhead alone never limits an unlimited pod.
    assert pod_resources(R(), R(memory_limit_in_bytes=10 << 20, cpu_quota=5000)) is None
    got = pod_resources(R(cpu_quota=20_000), None)
    assert got is not None and (got.cpu_quota, got.cpu_period) == (20_000, 100_000)


def test_resource_checks() -> None:
    req = request()
    req.config.linux.resources.unified["memory.high"] = "1G"
    with pytest.raises(InvalidArgument, match="cgroup v2"):
        check(req)
    assert plan(req, Config(), cgroup_v2=True).resources is not None
    req = request()
    req.config.linux.resources.memory_limit_in_bytes = -5
    with pytest.raises(InvalidArgument, match="memory_limit"):
        check(req)


def test_split_sysctls_defers_per_interface_ones() -> None:
    def s(name: str) -> Sysctl:
        return Sysctl(name, "1", SysctlNamespace.NET)

    early, late = split_sysctls((s("net.ipv4.conf.all.forwarding"),
                                 s("net.ipv4.conf.eth0.rp_filter"),
                                 s("net.ipv6.neigh.eth0.retrans_time_ms"),
                                 s("net.ipv4.ip_unprivileged_port_start"),
                                 s("net.ipv4.conf.default.arp_ignore")))
    assert [x.name for x in late] == ["net.ipv4.conf.eth0.rp_filter",
                                      "net.ipv6.neigh.eth0.retrans_time_ms"]
    assert len(early) == 3
