"""RunPodSandbox through a real daemon, real CNI plugins, runc and catatonit.

The network is the test run's own (bridge crt<N>, 10.199.<N>.0/24, IPAM in tmp);
traffic goes only to pod IPs in namespaces made here and to 127.0.0.1. The
`pod_net` fixture checks after each test that no netns, mount, veth, IP, NAT
rule, cgroup, runc state or record is left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from api import api_pb2
from runtimeservice import cgroups
from tests.integration.conftest import POD_CGROUP_PARENT, PodCrib
from tests.integration.daemon import Daemon, PodNet

pytestmark = pytest.mark.integration

NODE = api_pb2.NamespaceMode.NODE
POD = api_pb2.NamespaceMode.POD
CONTAINER = api_pb2.NamespaceMode.CONTAINER


# ---------------------------------------------------------------- helpers (shared)


def pod_config(name: str, *, uid: str = "", namespace: str = "crib-test", attempt: int = 0,
               network: int = POD, ipc: int = POD, pid: int = CONTAINER, hostname: str = "",
               dns: api_pb2.DNSConfig | None = None,
               ports: Sequence[api_pb2.PortMapping] = (),
               sysctls: Mapping[str, str] | None = None,
               labels: Mapping[str, str] | None = None,
               annotations: Mapping[str, str] | None = None,
               cgroup_parent: str = POD_CGROUP_PARENT) -> api_pb2.PodSandboxConfig:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid or f"uid-{name}",
                                            namespace=namespace, attempt=attempt),
        hostname=hostname, port_mappings=list(ports), labels=dict(labels or {}),
        annotations=dict(annotations or {}),
        linux=api_pb2.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent, sysctls=dict(sysctls or {}),
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(network=network, ipc=ipc, pid=pid))))
    if dns is not None:
        config.dns_config.CopyFrom(dns)
    return config


def run(d: Daemon, config: api_pb2.PodSandboxConfig, handler: str = "",
        timeout: float = 60) -> str:
    req = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return d.runtime.RunPodSandbox(req, timeout=timeout).pod_sandbox_id


def status(d: Daemon, sandbox_id: str) -> api_pb2.PodSandboxStatusResponse:
    return d.runtime.PodSandboxStatus(
        api_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))


def info(d: Daemon, sandbox_id: str) -> dict[str, object]:
    return json.loads(status(d, sandbox_id).info["info"])


def stop(d: Daemon, sandbox_id: str) -> None:
    d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))


def remove(d: Daemon, sandbox_id: str) -> None:
    d.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))


def listed(d: Daemon, flt: api_pb2.PodSandboxFilter | None = None) -> list[str]:
    req = api_pb2.ListPodSandboxRequest(filter=flt) if flt else api_pb2.ListPodSandboxRequest()
    return [p.id for p in d.runtime.ListPodSandbox(req).items]


def nsenter(*args: str) -> str:
    return subprocess.run(["nsenter", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


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
print("listening", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(("hello " + addr[0]).encode())
    c.close()
"""


@contextmanager
def listener_in(netns: str) -> Iterator[None]:
    """A TCP server on port 8080 inside `netns`; killed (by its pid) afterwards."""
    proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", LISTENER],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"listening"
        yield
    finally:
        proc.kill()
        proc.wait()


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


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


def process_gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# ---------------------------------------------------------------- tests


def test_run_ready_reachable_with_files_ports_and_sysctls(pod_crib: PodCrib,
                                                          pod_net: PodNet) -> None:
    d = pod_crib()
    host_port = free_port()
    dns = api_pb2.DNSConfig(servers=["10.199.1.53"], searches=["svc.test", "test"],
                            options=["ndots:5"])
    config = pod_config(
        "web", hostname="web-0", dns=dns, labels={"app": "web"}, annotations={"a": "b"},
        ports=[api_pb2.PortMapping(container_port=8080, host_port=host_port)],
        sysctls={"net.ipv4.ip_unprivileged_port_start": "81", "kernel.shmmni": "2048"})
    before = time.time_ns()
    sid = run(d, config)
    assert len(sid) == 64 and int(sid, 16) >= 0

    st = status(d, sid)
    s = st.status
    assert s.id == sid and s.state == api_pb2.SANDBOX_READY
    assert before <= s.created_at <= time.time_ns()
    assert s.metadata == config.metadata
    assert dict(s.labels) == {"app": "web"} and dict(s.annotations) == {"a": "b"}
    assert s.linux.namespaces.options == config.linux.security_context.namespace_options
    assert s.runtime_handler == "" and st.timestamp >= s.created_at
    ip = s.network.ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(pod_net.subnet)
    assert pod_net.allocated() == [ip]
    assert len(pod_net.veths()) == 1

    details = json.loads(st.info["info"])
    netns, paths = details["netNamespacePath"], details["namespacePaths"]
    files = {k: Path(v).read_text() for k, v in details["podFiles"].items()}
    assert files["hostname"] == "web-0\n"
    assert files["resolv.conf"] == "nameserver 10.199.1.53\nsearch svc.test test\n" \
                                   "options ndots:5\n"
    assert f"{ip}\tweb-0" in files["hosts"] and "127.0.0.1" in files["hosts"]
    assert nsenter(f"--uts={paths['uts']}", "hostname") == "web-0"
    assert nsenter(f"--net={netns}", "cat",
                   "/proc/sys/net/ipv4/ip_unprivileged_port_start") == "81"
    assert nsenter(f"--ipc={paths['ipc']}", "cat", "/proc/sys/kernel/shmmni") == "2048"
    assert Path("/proc/sys/kernel/shmmni").read_text().strip() != "2048"
    shm = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
           if line.split()[4] == details["shm"]]
    assert shm and shm[0][shm[0].index("-") + 1] == "tmpfs"
    layout = cgroups.detect()
    assert all((h / details["cgroup"].strip("/")).is_dir() for h in layout.hierarchies())
    assert details["pid"] == 0 and "pid" not in paths  # no shared PID namespace: no infra

    with listener_in(netns):
        assert fetch(ip, 8080).startswith(f"hello {pod_net.gateway}")
        assert fetch("127.0.0.1", host_port).startswith("hello ")
    stop(d, sid)
    remove(d, sid)
    assert listed(d) == []


def test_shared_pid_namespace_gets_an_infra_process(pod_crib: PodCrib) -> None:
    d = pod_crib()
    sid = run(d, pod_config("shared", pid=POD))
    details = info(d, sid)
    pid = details["pid"]
    assert isinstance(pid, int) and pid > 0
    assert details["processStatus"] == "running"
    paths = details["namespacePaths"]
    assert isinstance(paths, dict)
    assert paths["pid"] == f"/proc/{pid}/ns/pid"
    assert ns_inode(f"/proc/{pid}/ns/pid") != ns_inode("/proc/self/ns/pid")
    for kind, key in (("net", "network"), ("ipc", "ipc"), ("uts", "uts")):
        assert ns_inode(f"/proc/{pid}/ns/{kind}") == ns_inode(paths[key])
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"/catatonit"
    cg = Path(f"/proc/{pid}/cgroup").read_text()
    assert str(details["cgroup"]) in cg
    stop(d, sid)
    assert process_gone(pid)
    assert info(d, sid)["pid"] == 0
    remove(d, sid)


def test_host_network_pod_sees_the_host_interfaces(pod_crib: PodCrib, pod_net: PodNet) -> None:
    d = pod_crib()
    sid = run(d, pod_config("hostnet", network=NODE, pid=POD))
    st = status(d, sid)
    assert st.status.state == api_pb2.SANDBOX_READY
    assert st.status.network.ip == "" and not st.status.network.additional_ips
    details = json.loads(st.info["info"])
    assert details["netNamespacePath"] == ""
    assert pod_net.allocated() == [] and pod_net.veths() == []
    pid = details["pid"]
    # The infra process lives in the node's network and UTS namespaces, the pod's IPC one.
    assert ns_inode(f"/proc/{pid}/ns/net") == ns_inode("/proc/self/ns/net")
    assert ns_inode(f"/proc/{pid}/ns/uts") == ns_inode("/proc/self/ns/uts")
    assert ns_inode(f"/proc/{pid}/ns/ipc") == ns_inode(details["namespacePaths"]["ipc"])
    def links(out: str) -> set[str]:  # veths come and go with other pods on the node
        names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
        return {n for n in names if not n.startswith("veth")}

    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    seen = nsenter("-t", str(pid), "--net", "ip", "-o", "link")
    assert links(seen) == links(host_links) and len(links(seen)) > 1
    hostname = Path(details["podFiles"]["hostname"]).read_text().strip()
    assert hostname == os.uname().nodename
    remove(d, sid)  # Remove of a READY sandbox stops it first


def test_host_ipc_pod_has_no_shm_and_no_ipc_namespace(pod_crib: PodCrib) -> None:
    d = pod_crib()
    sid = run(d, pod_config("hostipc", ipc=NODE))
    details = info(d, sid)
    assert details["shm"] == ""
    assert "ipc" not in details["namespacePaths"]
    remove(d, sid)


def test_pod_cgroup_gets_resources_plus_overhead(pod_crib: PodCrib) -> None:
    d = pod_crib()
    config = pod_config("limited")
    config.linux.resources.CopyFrom(api_pb2.LinuxContainerResources(
        memory_limit_in_bytes=64 << 20, cpu_quota=50_000, cpu_period=100_000, cpu_shares=256))
    config.linux.overhead.CopyFrom(api_pb2.LinuxContainerResources(
        memory_limit_in_bytes=16 << 20, cpu_quota=10_000, cpu_period=100_000, cpu_shares=64))
    sid = run(d, config)
    cgroup = str(info(d, sid)["cgroup"]).strip("/")
    layout = cgroups.detect()
    if layout.is_v2:
        d2 = layout.root / cgroup
        assert (d2 / "memory.max").read_text().strip() == str(80 << 20)
        assert (d2 / "cpu.max").read_text().split() == ["60000", "100000"]
    else:
        mem, cpu = layout.v1["memory"] / cgroup, layout.v1["cpu"] / cgroup
        assert (mem / "memory.limit_in_bytes").read_text().strip() == str(80 << 20)
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "60000"
        assert (cpu / "cpu.shares").read_text().strip() == "320"
    remove(d, sid)


def test_builtin_default_network_when_no_cni_config(pod_crib: PodCrib, pod_net: PodNet) -> None:
    for conf in pod_net.conf_dir.iterdir():
        conf.unlink()
    bridge, subnet = "cribtest2", "10.199.4.0/24"
    d = pod_crib(extra_config=f"default_network = true\ndefault_network_bridge = '{bridge}'\n"
                              f"default_network_subnet = '{subnet}'\n")
    try:
        conds = {c.type: c for c in d.runtime.Status(api_pb2.StatusRequest()).status.conditions}
        assert conds["NetworkReady"].status is True
        sid = run(d, pod_config("default-net"))
        ip = status(d, sid).status.network.ip
        assert ipaddress.ip_address(ip) in ipaddress.ip_network(subnet)
        store = d.root / "cni" / "networks" / "crib"  # IPAM state under crib's own root
        assert (store / ip).exists()
        with listener_in(str(info(d, sid)["netNamespacePath"])):
            assert fetch(ip, 8080).startswith("hello ")
        remove(d, sid)
        assert not (store / ip).exists()
        nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True,
                             text=True).stdout
        assert "10.199.4." not in nat
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
