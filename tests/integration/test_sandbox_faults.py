"""RunPodSandbox when things go wrong: bad input, failing CNI plugins, a killed daemon,
retries and name clashes. After each, nothing of the sandbox may remain."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from api import api_pb2
from tests.integration.conftest import PodCrib
from tests.integration.daemon import Daemon, PodNet, mounts_under, private_roots
from tests.integration.test_sandbox_run import NODE, listed, pod_config, remove, run

pytestmark = pytest.mark.integration

# A chained CNI plugin the tests control: ADD records its pid in the gate directory,
# then fails or waits for a "release" file and passes the previous result on.
GATE_PLUGIN = """#!{python}
import json, os, sys, time
conf = json.load(sys.stdin)
gate = conf["gate"]
command = os.environ["CNI_COMMAND"]
if command == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}}))
elif command == "ADD":
    with open(os.path.join(gate, "started-%d" % os.getpid()), "w") as f:
        f.write(str(os.getpid()))
    if conf.get("fail"):
        print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 100,
                          "msg": "injected failure for " + os.environ["CNI_CONTAINERID"]}}))
        sys.exit(1)
    while not os.path.exists(os.path.join(gate, "release")):
        time.sleep(0.02)
    result = conf.get("prevResult") or {{}}
    result["cniVersion"] = conf["cniVersion"]
    print(json.dumps(result))
"""


class Gate:
    def __init__(self, net: PodNet, tmp: Path, fail: bool = False) -> None:
        self.dir = tmp / "gate"
        self.dir.mkdir()
        plugin = net.plugin_dir / "crib-gate"
        net.plugin_dir.mkdir(parents=True, exist_ok=True)
        plugin.write_text(GATE_PLUGIN.format(python=sys.executable))
        plugin.chmod(0o755)
        net.write([{"type": "crib-gate", "gate": str(self.dir), "fail": fail}])

    def started(self) -> list[int]:
        return [int(p.read_text() or 0) for p in self.dir.glob("started-*")]

    def wait_started(self, n: int = 1) -> list[int]:
        while len(self.started()) < n or 0 in self.started():
            time.sleep(0.02)
        return self.started()

    def release(self) -> None:
        (self.dir / "release").touch()


def nothing_left(d: Daemon, net: PodNet) -> None:
    assert listed(d) == []
    assert net.allocated() == [] and net.veths() == []
    for parent in (d.runroot / "ns", d.runroot / "pods", d.root / "pods"):
        assert not parent.exists() or list(parent.iterdir()) == []
    allowed = {str(p) for p in private_roots(d)}
    assert [m for m in mounts_under(d.base) if m not in allowed] == []
    assert list((d.root / "sandboxes").glob("*.json")) == []


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value


# ---------------------------------------------------------------- bad input


def _no_meta(c: api_pb2.PodSandboxConfig) -> None:
    c.ClearField("metadata")


BAD_CONFIGS: dict[str, tuple[Callable[[api_pb2.PodSandboxConfig], None], str]] = {
    "missing metadata": (_no_meta, "metadata"),
    "empty name": (lambda c: setattr(c.metadata, "name", ""), "metadata.name"),
    "empty uid": (lambda c: setattr(c.metadata, "uid", ""), "metadata.uid"),
    "empty namespace": (lambda c: setattr(c.metadata, "namespace", ""), "metadata.namespace"),
    "relative log_directory": (lambda c: setattr(c, "log_directory", "var/log/pods"),
                               "var/log/pods"),
    "cgroup parent with ..": (lambda c: setattr(c.linux, "cgroup_parent", "/a/../../b"),
                              "/a/../../b"),
    "slice with cgroupfs": (lambda c: setattr(c.linux, "cgroup_parent", "kubepods.slice"),
                            "kubepods.slice"),
    "unsafe sysctl": (lambda c: c.linux.sysctls.update({"kernel.panic": "1"}), "kernel.panic"),
    "net sysctl on host network": (
        lambda c: (c.linux.sysctls.update({"net.ipv4.ip_forward": "1"}),
                   setattr(c.linux.security_context.namespace_options, "network", NODE)),
        "net.ipv4.ip_forward"),
    "bad hostname": (lambda c: setattr(c, "hostname", "no_underscores"), "no_underscores"),
    "bad DNS server": (lambda c: c.dns_config.servers.append("dns.example"), "dns.example"),
    "bad host port": (lambda c: c.port_mappings.add(container_port=80, host_port=70000),
                      "70000"),
    "target pid mode": (lambda c: setattr(c.linux.security_context.namespace_options, "pid",
                                          api_pb2.NamespaceMode.TARGET), "TARGET"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_input_is_invalid_argument_and_creates_nothing(
        case: str, pod_crib: PodCrib, pod_net: PodNet) -> None:
    d = pod_crib()
    mutate, needle = BAD_CONFIGS[case]
    config = pod_config("bad")
    mutate(config)
    err = rpc_error(lambda: run(d, config))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert needle in (err.details() or "")
    nothing_left(d, pod_net)


def test_unknown_runtime_handler_is_invalid_argument(pod_crib: PodCrib,
                                                     pod_net: PodNet) -> None:
    d = pod_crib()
    err = rpc_error(lambda: run(d, pod_config("bad"), handler="nosuch"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nosuch" in (err.details() or "")
    nothing_left(d, pod_net)


def test_sysctl_value_the_kernel_refuses_unwinds_everything(pod_crib: PodCrib,
                                                            pod_net: PodNet) -> None:
    d = pod_crib()
    config = pod_config("bad-value", sysctls={"net.ipv4.ip_unprivileged_port_start": "x"})
    err = rpc_error(lambda: run(d, config))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "ip_unprivileged_port_start" in (err.details() or "")
    nothing_left(d, pod_net)
    # the name is free again
    remove(d, run(d, pod_config("bad-value")))


# ---------------------------------------------------------------- CNI failures, crashes


def test_failing_cni_plugin_is_a_clear_error_and_leaves_nothing(
        tmp_path: Path, pod_crib: PodCrib, pod_net: PodNet) -> None:
    Gate(pod_net, tmp_path, fail=True)
    d = pod_crib()
    err = rpc_error(lambda: run(d, pod_config("cni-fails", pid=api_pb2.NamespaceMode.POD)))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "crib-gate" in (err.details() or "") and "injected failure" in (err.details() or "")
    nothing_left(d, pod_net)  # the bridge plugin's IP and veth were rolled back too


def test_infra_failing_while_cni_adds_unwinds_both(pod_crib: PodCrib, pod_net: PodNet) -> None:
    """The infra process starts at the same time as CNI ADD; its failure undoes the ADD too."""
    d = pod_crib(extra_config="\n[runtime]\ninfra_binary = '/nonexistent/catatonit'\n")
    err = rpc_error(lambda: run(d, pod_config("infra-fails", pid=api_pb2.NamespaceMode.POD)))
    assert err.code() != grpc.StatusCode.OK
    details = err.details() or ""
    assert "run" in details and "/nonexistent/catatonit" in details, details
    nothing_left(d, pod_net)
    assert list((d.runroot / "runtimes").glob("*/*")) == []  # no runc state left


def test_daemon_killed_during_run_recovers_to_absent(
        tmp_path: Path, pod_crib: PodCrib, pod_net: PodNet) -> None:
    gate = Gate(pod_net, tmp_path)
    d = pod_crib()
    future = d.runtime.RunPodSandbox.future(
        api_pb2.RunPodSandboxRequest(config=pod_config("killed")), timeout=60)
    [plugin_pid] = gate.wait_started()
    # The bridge plugin has run: the pod has a veth and an IP while ADD is stuck.
    assert len(pod_net.allocated()) == 1 and len(pod_net.veths()) == 1
    d.stop(signal.SIGKILL)
    os.kill(plugin_pid, signal.SIGKILL)  # the test's own plugin process, orphaned now
    with pytest.raises(grpc.RpcError):
        future.result()
    gate.release()
    d.start()
    nothing_left(d, pod_net)
    assert pod_net.nat_rules() == []


# ---------------------------------------------------------------- names


def test_identical_retry_in_flight_joins_and_clashes_are_already_exists(
        tmp_path: Path, pod_crib: PodCrib, pod_net: PodNet) -> None:
    gate = Gate(pod_net, tmp_path)
    d = pod_crib()
    req = api_pb2.RunPodSandboxRequest(config=pod_config("retried", labels={"try": "1"}))
    first = d.runtime.RunPodSandbox.future(req, timeout=60)
    gate.wait_started()
    # The kubelet gave up waiting and retries the very same request.
    retry = d.runtime.RunPodSandbox.future(req, timeout=60)
    # A different request for the same pod name while the first is in flight.
    other = pod_config("retried", labels={"try": "2"})
    err = rpc_error(lambda: run(d, other))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "retried" in (err.details() or "")
    gate.release()
    sid = first.result().pod_sandbox_id
    assert retry.result().pod_sandbox_id == sid
    assert len(gate.started()) == 1  # one creation, not two
    assert listed(d) == [sid]
    # Done: the same request again still gets the id; another one is refused.
    assert d.runtime.RunPodSandbox(req).pod_sandbox_id == sid
    err = rpc_error(lambda: run(d, other))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and sid in (err.details() or "")
    # Another attempt is another name.
    next_attempt = pod_config("retried", attempt=1)
    sid2 = run(d, next_attempt)
    assert sid2 != sid
    remove(d, sid)
    # Once removed, the name is free for a new sandbox.
    sid3 = run(d, other)
    assert sid3 not in (sid, sid2)
    for s in (sid2, sid3):
        remove(d, s)
    assert json.dumps(listed(d)) == "[]"


def test_no_network_config_is_failed_precondition_before_anything_is_made(
        pod_crib: PodCrib, pod_net: PodNet) -> None:
    for conf in pod_net.conf_dir.iterdir():
        conf.unlink()
    d = pod_crib()
    conds = {c.type: c for c in d.runtime.Status(api_pb2.StatusRequest()).status.conditions}
    assert conds["NetworkReady"].status is False
    err = rpc_error(lambda: run(d, pod_config("no-net")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(pod_net.conf_dir) in (err.details() or "")
    nothing_left(d, pod_net)
    # A host-network pod needs no CNI network.
    remove(d, run(d, pod_config("host-net", network=NODE)))
