"""A crib daemon for the single-area benchmarks: its own dirs, CNI network and cgroup parent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from api import api_pb2, api_pb2_grpc
from runtimeservice import cni, namespaces

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BenchNet:
    """What one benchmark owns on the host, removed again by `cleanup_host`."""

    name: str
    bridge: str
    subnet: str
    cgroup_parent: str


def start_daemon(base: Path, net: BenchNet, extra_toml: str = ""
                 ) -> tuple[subprocess.Popen[bytes], grpc.Channel]:
    """Start crib under `base` on `net` and wait until it has recovered its state."""
    conf_dir = base / "net.d"
    conf_dir.mkdir(parents=True)
    conf = cni.default_conflist(net.subnet, net.bridge, data_dir=base / "ipam", name=net.name)
    (conf_dir / "10-bench.conflist").write_text(json.dumps(conf))
    (base / "crib.toml").write_text(f"[network]\ncni_conf_dir = '{conf_dir}'\n" + extra_toml)
    sock = base / "run" / "crib.sock"
    argv = [sys.executable, "-m", "cri", "--config", str(base / "crib.toml"), "--config-dir",
            str(base / "d"), "--socket", str(sock), "--root", str(base / "root"), "--runroot",
            str(base / "run"), "--log-level", "warning"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=(base / "crib.log").open("wb"),
                            start_new_session=True)
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit((base / "crib.log").read_text())
        time.sleep(0.01)
    ch = grpc.insecure_channel(f"unix://{sock}")
    stub = api_pb2_grpc.RuntimeServiceStub(ch)
    while True:
        try:  # UNAVAILABLE until recovery is done
            stub.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=5)
            return proc, ch
        except grpc.RpcError:
            time.sleep(0.01)


def cleanup_host(base: Path, net: BenchNet) -> None:
    """Remove the bridge, crib's private mount roots and the cgroup parent."""
    subprocess.run(["ip", "link", "del", net.bridge], capture_output=True)
    for root in (base / "run" / "ns", base / "run" / "pods"):
        namespaces.release_root(root)
    for h in Path("/sys/fs/cgroup").iterdir():
        d = h / net.cgroup_parent.strip("/")
        if d.is_dir():
            d.rmdir()
