"""The infra container's OCI config, process liveness, and NetworkReady."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from cri.config import Config
from runtimeservice import netready
from runtimeservice.sandbox_infra import (
    InfraSpec,
    alive,
    bundle_config,
    process_start_time,
)


def spec(**namespaces: str) -> InfraSpec:
    return InfraSpec(sandbox_id="ab" * 32, bundle=Path("/run/b"), binary="/usr/bin/catatonit",
                     cgroups_path="/crib/crib-x/crib-ab", namespaces=namespaces)


def test_bundle_joins_the_pod_namespaces_and_gets_its_own_pid_namespace() -> None:
    conf = bundle_config(spec(network="/run/ns/net", ipc="/run/ns/ipc", uts="/run/ns/uts"))
    assert conf["linux"]["namespaces"] == [
        {"type": "pid"}, {"type": "mount"},
        {"type": "network", "path": "/run/ns/net"}, {"type": "ipc", "path": "/run/ns/ipc"},
        {"type": "uts", "path": "/run/ns/uts"}]
    assert conf["process"]["args"] == ["/catatonit", "-P"]
    assert conf["process"]["noNewPrivileges"] is True
    assert conf["process"]["capabilities"]["bounding"] == []
    assert conf["root"] == {"path": "rootfs", "readonly": True}
    bind = conf["mounts"][0]
    assert bind["source"] == "/usr/bin/catatonit" and "ro" in bind["options"]
    assert conf["linux"]["cgroupsPath"] == "/crib/crib-x/crib-ab"


def test_host_namespaces_are_simply_not_listed() -> None:
    conf = bundle_config(spec(ipc="/run/ns/ipc"))  # host network (and so host UTS)
    types = [n["type"] for n in conf["linux"]["namespaces"]]
    assert types == ["pid", "mount", "ipc"]


def test_alive_checks_the_start_time() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None and alive(me, start)
    assert not alive(me, start + 1) and not alive(0, 0)


def test_network_ready_follows_config_and_plugins(tmp_path: Path) -> None:
    cfg = Config()
    cfg.root = str(tmp_path / "root")
    cfg.network.cni_conf_dir = str(tmp_path / "net.d")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    cfg.network.cni_plugin_dirs = [str(plugins)]

    def condition() -> tuple[bool, str, str]:
        return asyncio.run(netready.network_condition(netready.pod_network(cfg)))

    ok, reason, message = condition()
    assert not ok and reason == "NetworkPluginNotReady" and "default_network is off" in message
    cfg.network.default_network = True
    ok, _, message = condition()
    assert not ok and "'bridge' not found" in message  # the built-in network needs plugins
    for name in ("bridge", "portmap"):
        (plugins / name).write_text("#!/bin/sh\n")
        (plugins / name).chmod(0o755)
    assert condition() == (True, "", "")
    net = netready.default_network(cfg)
    assert net is not None
    ipam = net.plugins[0]["ipam"]
    assert ipam["dataDir"] == str(tmp_path / "root" / "cni" / "networks")
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "10-x.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "macvlan"}]}))
    ok, _, message = condition()
    assert not ok and "macvlan" in message  # the conf dir's network wins over the built-in
