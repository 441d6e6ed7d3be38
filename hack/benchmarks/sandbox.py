"""Pod sandbox latency through a real daemon, real CNI plugins (and runc for infra).

    sudo python3 -m hack.benchmarks.sandbox [--n 30] [--concurrent 10] [--shared-pid]

Starts crib on a temporary root/runroot with its own CNI network (bridge
cribbench0, 10.199.2.0/24, IPAM in the temp dir), then measures:
RunPodSandbox sequentially (N calls) and `--concurrent` at once, and
Stop+Remove sequentially. `--shared-pid` makes every pod share one PID
namespace (so each gets a catatonit infra process). Prints JSON; everything
is removed afterwards (sandboxes, the bridge, the daemon's private mounts).
Numbers go in notes; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from api import api_pb2, api_pb2_grpc
from hack.benchmarks.localcrib import BenchNet, cleanup_host, start_daemon

NET = BenchNet(name="cribbench", bridge="cribbench0", subnet="10.199.2.0/24",
               cgroup_parent="/cribbench")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))], 1)


def summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(ms), 1), "p95_ms": pct(ms, 0.95),
            "max_ms": round(max(ms), 1)}


class Bench:
    def __init__(self, stub: api_pb2_grpc.RuntimeServiceStub, shared_pid: bool) -> None:
        self.stub = stub
        self.shared_pid = shared_pid
        self.count = 0

    def config(self) -> api_pb2.PodSandboxConfig:
        self.count += 1
        n = self.count
        pid = api_pb2.NamespaceMode.POD if self.shared_pid else api_pb2.NamespaceMode.CONTAINER
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=f"bench-{n}", uid=f"uid-{n}",
                                                namespace="bench"),
            hostname=f"bench-{n}", labels={"bench": "1"},
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=NET.cgroup_parent,
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=api_pb2.NamespaceOption(pid=pid))))

    def run(self, config: api_pb2.PodSandboxConfig) -> tuple[str, float]:
        t = time.perf_counter()
        sid = self.stub.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config),
                                      timeout=120).pod_sandbox_id
        return sid, (time.perf_counter() - t) * 1000

    def stop_remove(self, sid: str) -> float:
        t = time.perf_counter()
        self.stub.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sid))
        self.stub.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=sid))
        return (time.perf_counter() - t) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30, help="sequential RunPodSandbox calls")
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--shared-pid", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    with tempfile.TemporaryDirectory(prefix="crib-bench-") as tmp:
        base = Path(tmp)
        proc, ch = start_daemon(base, NET)
        bench = Bench(api_pb2_grpc.RuntimeServiceStub(ch), args.shared_pid)
        ids: list[str] = []
        try:
            bench.run(bench.config())  # warm-up: imports, first CNI config load, bridge
            ids += [p.id for p in bench.stub.ListPodSandbox(
                api_pb2.ListPodSandboxRequest()).items]
            seq = []
            for _ in range(args.n):
                sid, ms = bench.run(bench.config())
                ids.append(sid)
                seq.append(ms)
            configs = [bench.config() for _ in range(args.concurrent)]
            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                conc = list(pool.map(bench.run, configs))
            wall = (time.perf_counter() - t) * 1000
            ids += [sid for sid, _ in conc]
            t = time.perf_counter()
            bench.stub.ListPodSandbox(api_pb2.ListPodSandboxRequest())
            list_ms = (time.perf_counter() - t) * 1000
            removal = [bench.stop_remove(sid) for sid in list(ids)]
            ids.clear()
            result = {
                "shared_pid": args.shared_pid,
                "run_sequential": {"n": args.n, **summary(seq)},
                "run_concurrent": {"n": args.concurrent, **summary([ms for _, ms in conc]),
                                   "wall_ms": round(wall, 1)},
                "list_ms_with_pods": round(list_ms, 2),
                "stop_remove": {"n": len(removal), **summary(removal)},
            }
        finally:
            for sid in ids:
                bench.stop_remove(sid)
            ch.close()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
            cleanup_host(base, NET)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
