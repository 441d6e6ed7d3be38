"""Stop, Remove, List and restarts of pod sandboxes through a real daemon."""

from __future__ import annotations

import asyncio
import ipaddress
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from api import api_pb2
from runtimeservice import cgroups, namespaces
from tests.integration.conftest import PodCrib
from tests.integration.daemon import PodNet, mounts_under
from tests.integration.test_sandbox_run import (
    POD,
    info,
    listed,
    pod_config,
    process_gone,
    remove,
    run,
    status,
    stop,
)

pytestmark = pytest.mark.integration

READY = api_pb2.SANDBOX_READY
NOTREADY = api_pb2.SANDBOX_NOTREADY


def state_filter(state: int, **kw: object) -> api_pb2.PodSandboxFilter:
    return api_pb2.PodSandboxFilter(state=api_pb2.PodSandboxStateValue(state=state), **kw)


def test_stop_releases_network_and_remove_leaves_nothing(pod_crib: PodCrib,
                                                         pod_net: PodNet) -> None:
    d = pod_crib()
    sid = run(d, pod_config("lifecycle", pid=POD))
    details = info(d, sid)
    ip = status(d, sid).status.network.ip
    assert pod_net.allocated() == [ip] and len(pod_net.veths()) == 1
    assert pod_net.nat_rules()  # the bridge plugin's masquerade rules for the pod

    stop(d, sid)
    st = status(d, sid).status
    assert st.state == NOTREADY
    assert st.network.ip == "" and not st.network.additional_ips
    assert pod_net.allocated() == [] and pod_net.veths() == [] and pod_net.nat_rules() == []
    assert listed(d) == [sid]
    stop(d, sid)  # again: fine
    assert status(d, sid).status.state == NOTREADY

    netns = Path(str(details["netNamespacePath"]))
    ns_dir, shm = netns.parent, str(details["shm"])
    assert netns.exists()  # pinned until Remove
    remove(d, sid)
    assert not ns_dir.exists()
    assert [m for m in mounts_under(d.base) if m.startswith((str(ns_dir), shm))] == []
    layout = cgroups.detect()
    assert not any((h / str(details["cgroup"]).strip("/")).exists()
                   for h in layout.hierarchies())
    assert not Path(str(details["podFiles"]["hosts"])).parent.exists()  # type: ignore[index]
    with pytest.raises(grpc.RpcError) as err:
        status(d, sid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    remove(d, sid)  # again: fine
    assert listed(d) == []


def test_stop_and_remove_of_unknown_ids_succeed(pod_crib: PodCrib) -> None:
    d = pod_crib()
    for unknown in ("0" * 64, "deadbeef"):
        stop(d, unknown)
        remove(d, unknown)
    with pytest.raises(grpc.RpcError) as err:
        status(d, "0" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_remove_of_a_ready_sandbox_stops_it_first(pod_crib: PodCrib, pod_net: PodNet) -> None:
    d = pod_crib()
    sid = run(d, pod_config("direct-remove", pid=POD))
    pid = info(d, sid)["pid"]
    remove(d, sid)
    assert isinstance(pid, int) and pid > 0 and process_gone(pid)
    assert listed(d) == [] and pod_net.allocated() == []


def test_list_filters_alone_and_combined(pod_crib: PodCrib) -> None:
    d = pod_crib()
    a = run(d, pod_config("a", labels={"app": "a", "tier": "front"}))
    b = run(d, pod_config("b", labels={"app": "b", "tier": "front"}))
    c = run(d, pod_config("c", labels={"app": "a", "tier": "back"}))
    stop(d, c)

    def ids(**kw: object) -> set[str]:
        return set(listed(d, api_pb2.PodSandboxFilter(**kw)))  # type: ignore[arg-type]

    assert set(listed(d)) == {a, b, c}
    assert ids(id=a) == {a} and ids(id=a[:10]) == {a}
    assert set(listed(d, state_filter(READY))) == {a, b}
    assert set(listed(d, state_filter(NOTREADY))) == {c}
    assert ids(label_selector={"tier": "front"}) == {a, b}
    assert ids(label_selector={"app": "a"}) == {a, c}
    assert ids(label_selector={"app": "a", "tier": "back"}) == {c}
    assert ids(label_selector={"app": "zzz"}) == set()
    assert set(listed(d, state_filter(READY, label_selector={"app": "a"}))) == {a}
    assert set(listed(d, state_filter(READY, id=c[:12]))) == set()
    assert set(listed(d, state_filter(NOTREADY, id=c[:12], label_selector={"app": "a"}))) \
        == {c}
    assert ids(id=b, label_selector={"app": "a"}) == set()

    pods = d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items
    by_id = {p.id: p for p in pods}
    assert by_id[a].metadata.name == "a" and by_id[a].labels["tier"] == "front"
    assert by_id[a].state == READY and by_id[c].state == NOTREADY and by_id[a].created_at > 0
    streamed = [p for resp in d.runtime.StreamPodSandboxes(
        api_pb2.StreamPodSandboxesRequest(filter=state_filter(READY)))
        for p in resp.pod_sandboxes]
    assert {p.id for p in streamed} == {a, b}
    for sid in (a, b, c):
        remove(d, sid)


def test_twenty_concurrent_sandboxes_get_distinct_ips(pod_crib: PodCrib,
                                                      pod_net: PodNet) -> None:
    d = pod_crib()
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda i: run(d, pod_config(f"many-{i}", pid=POD if i % 4 == 0
                                                         else api_pb2.NamespaceMode.CONTAINER)),
                            range(20)))
    assert len(set(ids)) == 20
    ips = [status(d, sid).status.network.ip for sid in ids]
    assert len(set(ips)) == 20
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(pod_net.subnet) for ip in ips)
    assert sorted(pod_net.allocated()) == sorted(ips)
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda sid: remove(d, sid), ids))
    assert listed(d) == [] and pod_net.allocated() == []


def test_restart_keeps_the_same_list_statuses_and_ips(pod_crib: PodCrib) -> None:
    d = pod_crib()
    ready = run(d, pod_config("stays-ready", labels={"k": "v"}))
    shared = run(d, pod_config("shared-pid", pid=POD))
    stopped = run(d, pod_config("stopped"))
    stop(d, stopped)

    def snapshot() -> dict[str, api_pb2.PodSandboxStatus]:
        return {sid: status(d, sid).status for sid in listed(d)}

    before = snapshot()
    infra = info(d, shared)["pid"]
    d.stop()
    d.start()
    after = snapshot()
    assert after == before
    assert after[ready].state == READY and after[ready].network.ip
    assert after[stopped].state == NOTREADY
    assert info(d, shared)["pid"] == infra
    # the name is still taken by the recovered sandbox, and a retry gets its id
    assert run(d, pod_config("stays-ready", labels={"k": "v"})) == ready
    with pytest.raises(grpc.RpcError) as err:
        run(d, pod_config("stays-ready", labels={"k": "other"}))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for sid in (ready, shared, stopped):
        remove(d, sid)


def drop_nat_rules_of(ip: str) -> None:
    """What a reboot does to the pod's iptables rules (the bridge plugin's masquerade)."""
    rules = subprocess.run(["iptables", "-t", "nat", "-S"], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    chains = set()
    for rule in rules:
        if rule.startswith("-A ") and f"{ip}/32" in rule:
            parts = shlex.split(rule)
            if "-j" in parts and parts[parts.index("-j") + 1].startswith("CNI-"):
                chains.add(parts[parts.index("-j") + 1])
            subprocess.run(["iptables", "-t", "nat", "-D", *parts[1:]], check=True)
    for chain in chains:
        subprocess.run(["iptables", "-t", "nat", "-F", chain], check=True)
        subprocess.run(["iptables", "-t", "nat", "-X", chain], check=True)


def test_restart_after_the_namespaces_vanished_marks_notready_and_frees_the_ip(
        pod_crib: PodCrib, pod_net: PodNet) -> None:
    d = pod_crib()
    sid = run(d, pod_config("rebooted"))
    details = info(d, sid)
    ip = status(d, sid).status.network.ip
    d.stop()
    # A reboot empties the runroot (a tmpfs) and the host's iptables; the IPAM store
    # (on disk) and crib's records survive it.
    asyncio.run(namespaces.remove(Path(str(details["netNamespacePath"])).parent))
    subprocess.run(["umount", "-l", str(details["shm"])], check=True)
    drop_nat_rules_of(ip)
    assert pod_net.allocated() == [ip]
    d.start()
    st = status(d, sid).status
    assert st.state == NOTREADY and st.network.ip == ""
    assert pod_net.allocated() == [] and pod_net.veths() == []
    assert listed(d, state_filter(NOTREADY)) == [sid]
    remove(d, sid)
    assert listed(d) == []
