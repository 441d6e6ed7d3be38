"""Sandbox records as CRI messages, list filters and recovery decisions (pure logic)."""

from __future__ import annotations

import dataclasses
import json

from api import api_pb2
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.sandbox_recover import recovery_changes
from runtimeservice.sandbox_status import matches, to_pod_sandbox, to_status, visible

READY = api_pb2.SANDBOX_READY
NOTREADY = api_pb2.SANDBOX_NOTREADY


def record(ident: str = "ab" * 32, state: SandboxState = SandboxState.READY,
           labels: dict[str, str] | None = None, **kw: object) -> SandboxRecord:
    config = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(name="web", uid="u", namespace="ns", attempt=2),
        labels=labels or {"app": "web"}, annotations={"note": "x"},
        linux=api_pb2.LinuxPodSandboxConfig(
            security_context=api_pb2.LinuxSandboxSecurityContext(
                namespace_options=api_pb2.NamespaceOption(pid=api_pb2.NamespaceMode.CONTAINER))))
    fields: dict[str, object] = dict(
        id=ident, config=config.SerializeToString(), runtime_handler="", created_at=123,
        state=state, fingerprint="f", ns_dir="/run/crib/ns/x", pod_dir="/var/lib/crib/pods/x",
        run_dir="/run/crib/pods/x", shm="/run/crib/pods/x/shm", cgroup="/crib/crib-x",
        cgroup_runc="/crib/crib-x", netns="/run/crib/ns/x/net", ipcns="/run/crib/ns/x/ipc",
        utsns="/run/crib/ns/x/uts", ips=("10.0.0.5", "fd00::5"), network_attached=True)
    fields.update(kw)
    return SandboxRecord(**fields)  # type: ignore[arg-type]


def flt(**kw: object) -> api_pb2.PodSandboxFilter:
    state = kw.pop("state", None)
    f = api_pb2.PodSandboxFilter(**kw)  # type: ignore[arg-type]
    if state is not None:
        f.state.state = state  # type: ignore[assignment]
    return f


def test_status_echoes_the_config_and_network() -> None:
    rec = record()
    resp = to_status(rec)
    s = resp.status
    assert s.id == rec.id and s.state == READY and s.created_at == 123
    assert s.metadata.name == "web" and s.metadata.attempt == 2
    assert dict(s.labels) == {"app": "web"} and dict(s.annotations) == {"note": "x"}
    assert s.network.ip == "10.0.0.5" and [i.ip for i in s.network.additional_ips] == ["fd00::5"]
    assert s.linux.namespaces.options.pid == api_pb2.NamespaceMode.CONTAINER
    assert resp.timestamp > 0 and "info" not in resp.info
    assert list(resp.containers_statuses) == []


def test_verbose_info() -> None:
    info = json.loads(to_status(record(), verbose=True).info["info"])
    assert info["netNamespacePath"] == "/run/crib/ns/x/net" and info["pid"] == 0
    assert info["processStatus"] == "none" and info["cgroup"] == "/crib/crib-x"
    assert info["config"]["metadata"]["name"] == "web"
    assert info["podFiles"]["hosts"] == "/var/lib/crib/pods/x/hosts"


def test_stopped_sandbox_has_no_ip_and_notready() -> None:
    rec = record(state=SandboxState.NOTREADY, ips=(), network_attached=False)
    s = to_status(rec).status
    assert s.state == NOTREADY and s.network.ip == ""
    assert to_pod_sandbox(rec).state == NOTREADY


def test_creating_is_never_visible() -> None:
    rec = record(state=SandboxState.CREATING)
    assert not visible(rec) and not matches(rec, None) and not matches(rec, flt())


def test_filters_alone_and_combined() -> None:
    rec = record(labels={"app": "web", "tier": "front"})
    assert matches(rec, None) and matches(rec, flt())
    assert matches(rec, flt(id="abab")) and not matches(rec, flt(id="abx"))
    assert matches(rec, flt(state=READY)) and not matches(rec, flt(state=NOTREADY))
    assert matches(rec, flt(label_selector={"app": "web"}))
    assert not matches(rec, flt(label_selector={"app": "web", "tier": "back"}))
    assert matches(rec, flt(id="ab", state=READY, label_selector={"tier": "front"}))
    assert not matches(rec, flt(id="ab", state=NOTREADY, label_selector={"tier": "front"}))


def test_pod_sandbox_for_list() -> None:
    p = to_pod_sandbox(record(runtime_handler="runc"))
    assert p.metadata.namespace == "ns" and p.labels["app"] == "web"
    assert p.annotations["note"] == "x" and p.runtime_handler == "runc" and p.created_at == 123


def test_recovery_decisions() -> None:
    rec = record()
    assert recovery_changes(rec, netns_alive=True, infra_alive=True) == ({}, False)
    changes, detach = recovery_changes(rec, netns_alive=False, infra_alive=True)
    assert changes == {"state": SandboxState.NOTREADY} and detach
    shared = dataclasses.replace(rec, infra_pid=42, infra_start=7, pidns="/proc/42/ns/pid")
    changes, detach = recovery_changes(shared, netns_alive=True, infra_alive=False)
    assert changes == {"infra_pid": 0, "infra_start": 0, "pidns": "",
                       "state": SandboxState.NOTREADY} and not detach
    stopped = record(state=SandboxState.NOTREADY, ips=(), network_attached=False)
    assert recovery_changes(stopped, netns_alive=False, infra_alive=True) == ({}, False)
    hostnet = record(netns="", network_attached=False, ips=())
    assert recovery_changes(hostnet, netns_alive=True, infra_alive=True) == ({}, False)
