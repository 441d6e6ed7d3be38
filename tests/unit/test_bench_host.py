"""Benchmark host cleanup: the pure parts (mountinfo escapes, CNI cache ownership)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hack.benchmarks import host
from hack.benchmarks.host import Owned, cni_cache_entries


def test_mountinfo_escapes_are_decoded() -> None:
    assert host._unescape(r"/tmp/a\040b\011c") == "/tmp/a b\tc"
    assert host._unescape(r"/plain/path") == "/plain/path"
    assert host._unescape("/odd\\x") == "/odd\\x"


def entry(path: Path, network: str, namespace: str) -> Path:
    path.write_text(json.dumps({"kind": "cniCacheV1", "networkName": network,
                                "cniArgs": [["IgnoreUnknown", "1"],
                                            ["K8S_POD_NAMESPACE", namespace]]}))
    return path


def test_cni_cache_entries_are_ours_by_network_or_pod_namespace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "CNI_CACHE", tmp_path)
    ours_net = entry(tmp_path / "bench-ctd0-net-abc-eth0", "bench-ctd0-net", "x")
    ours_lo = entry(tmp_path / "cni-loopback-abc-lo", "cni-loopback", "crib-compare")
    entry(tmp_path / "cni-loopback-def-lo", "cni-loopback", "default")
    (tmp_path / "garbage").write_text("not json")
    o = Owned("containerd", tmp_path / "base", "cg", "bench-ctd0", "10.201.0.0/24",
              "bench-ctd0-net", "crib-compare")
    assert sorted(cni_cache_entries(o)) == sorted([ours_net, ours_lo])


def test_no_cni_cache_directory_means_no_entries(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "CNI_CACHE", tmp_path / "missing")
    o = Owned("crib", tmp_path, "cg", "b0", "10.0.0.0/24", "net", "ns")
    assert cni_cache_entries(o) == []
