"""Benchmark runtime configurations: containerd's config.toml, hosts.toml, crib.toml, CNI."""

from __future__ import annotations

import tomllib
from pathlib import Path

from cri.config import load
from hack.benchmarks.containerd import render_config, render_hosts_toml
from hack.benchmarks.cribd import render_config as render_crib_config
from hack.benchmarks.runtime import cni_conflist

CRI = "io.containerd.grpc.v1.cri"


def test_containerd_config_keeps_everything_under_its_base(tmp_path: Path) -> None:
    base = tmp_path / "ctd"
    doc = tomllib.loads(render_config(base, base / "c.sock", base / "cni",
                                      "127.0.0.1:5000/crib-test/pause:3.9"))
    assert doc["version"] == 2
    assert doc["root"] == str(base / "root") and doc["state"] == str(base / "state")
    assert doc["grpc"]["address"] == str(base / "c.sock")
    assert doc["ttrpc"]["address"].startswith(str(base))
    cri = doc["plugins"][CRI]
    assert cri["sandbox_image"] == "127.0.0.1:5000/crib-test/pause:3.9"
    assert cri["netns_mounts_under_state_dir"] is True
    assert cri["restrict_oom_score_adj"] is True
    runc = cri["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"] == {"BinaryName": "/usr/sbin/runc", "Root": str(base / "runc"),
                               "SystemdCgroup": False}
    assert cri["cni"]["conf_dir"] == str(base / "cni")
    assert cri["registry"]["config_path"] == str(base / "certs.d")
    assert "io.containerd.runtime.v1.linux" not in doc["disabled_plugins"]


def test_hosts_toml_is_plain_http() -> None:
    doc = tomllib.loads(render_hosts_toml("127.0.0.1:5000"))
    assert doc["server"] == "http://127.0.0.1:5000"
    assert doc["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull", "resolve"]


def test_crib_config_is_accepted_by_crib(tmp_path: Path) -> None:
    f = tmp_path / "crib.toml"
    f.write_text(render_crib_config("127.0.0.1:5000", tmp_path / "cni",
                                    tmp_path / "registries.conf"))
    cfg = load(f, tmp_path / "no.d")
    assert cfg.image.insecure_registries == ["127.0.0.1:5000"]
    assert cfg.image.registries_conf == str(tmp_path / "registries.conf")
    assert cfg.network.cni_conf_dir == str(tmp_path / "cni")
    assert cfg.network.default_network is False
    assert cfg.runtime.cgroup_driver == "cgroupfs"
    assert cfg.handler("").path == "/usr/sbin/runc"
    assert cfg.metrics.enabled is False


def test_cni_conflist_adds_no_iptables_rules(tmp_path: Path) -> None:
    doc = cni_conflist("net", "bench-x0", "10.201.0.0/24", tmp_path / "ipam")
    (plugin,) = doc["plugins"]
    assert plugin["type"] == "bridge" and plugin["bridge"] == "bench-x0"
    assert plugin["ipMasq"] is False
    assert plugin["ipam"]["dataDir"] == str(tmp_path / "ipam")
    assert plugin["ipam"]["ranges"] == [[{"subnet": "10.201.0.0/24"}]]
