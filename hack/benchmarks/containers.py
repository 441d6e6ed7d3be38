"""Container latency and footprint through a real daemon, runc, conmon and CNI.

    sudo python3 -m hack.benchmarks.containers [--n 20] [--concurrent 10] [--scale 100]

Starts Debian's docker-registry on 127.0.0.1 (temporary storage) with
crib-test/busybox, and crib on a temporary root/runroot with its own CNI
network (bridge cribbench1, 10.199.3.0/24). One pod sandbox holds every
container. Measures, after a warm-up container:

- CreateContainer, StartContainer and both together, `--n` times in a row;
- `--concurrent` create+start at once (one thread each);
- ExecSync (`true`) round trips;
- with `--scale` running containers: ListContainers and ListContainerStats
  latency, conmon's memory per container (RSS and PSS), the daemon's RSS;
- StopContainer (timeout 0) + RemoveContainer per container.

Prints JSON; everything is removed afterwards. Numbers go in notes; nothing
here asserts a speed.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from api import api_pb2, api_pb2_grpc
from hack.benchmarks.localcrib import BenchNet, cleanup_host, start_daemon
from hack.testimages import build_image, push_all

NET = BenchNet(name="cribbenchctr", bridge="cribbench1", subnet="10.199.3.0/24",
               cgroup_parent="/cribbench-ctr")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))], 2)


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p95_ms": pct(ms, 0.95),
            "max_ms": round(max(ms), 2)}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def kib(pid: int, key: str, name: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def conmon_pids(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"/usr/bin/conmon\0") and marker.encode() in cmd:
                found.append(int(entry.name))
    return found


class Bench:
    def __init__(self, channel: grpc.Channel, image: str, sandbox_id: str,
                 pod: api_pb2.PodSandboxConfig) -> None:
        self.rt = api_pb2_grpc.RuntimeServiceStub(channel)
        self.image = image
        self.sandbox_id = sandbox_id
        self.pod = pod
        self.count = 0
        self.ids: list[str] = []

    def request(self) -> api_pb2.CreateContainerRequest:
        self.count += 1
        config = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=f"c{self.count}"),
            image=api_pb2.ImageSpec(image=self.image), args=["sleep", "100000"],
            log_path=f"c{self.count}.log", labels={"bench": "1"})
        return api_pb2.CreateContainerRequest(pod_sandbox_id=self.sandbox_id, config=config,
                                              sandbox_config=self.pod)

    def create_start(self, req: api_pb2.CreateContainerRequest) -> tuple[float, float]:
        t = time.perf_counter()
        cid = self.rt.CreateContainer(req, timeout=120).container_id
        created = time.perf_counter()
        self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=120)
        started = time.perf_counter()
        self.ids.append(cid)
        return (created - t) * 1000, (started - created) * 1000

    def stop_remove(self, cid: str) -> float:
        t = time.perf_counter()
        self.rt.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=0),
                              timeout=120)
        self.rt.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=120)
        self.ids.remove(cid)
        return (time.perf_counter() - t) * 1000


def image_toml(base: Path, registry: str) -> str:
    """The daemon pulls from the local test registry, and only from it."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "registries.conf").write_text("")
    return (f"[image]\nregistries_conf = '{base / 'registries.conf'}'\n"
            f"registries_conf_dir = '{base / 'registries.conf.d'}'\n"
            f"insecure_registries = ['{registry}']\n")


def measure(bench: Bench, daemon_pid: int, base: Path, args: argparse.Namespace
            ) -> dict[str, object]:
    warm = bench.request()
    bench.create_start(warm)
    bench.stop_remove(bench.ids[-1])
    create, start, both = [], [], []
    for _ in range(args.n):
        c, s = bench.create_start(bench.request())
        create.append(c)
        start.append(s)
        both.append(c + s)
    reqs = [bench.request() for _ in range(args.concurrent)]
    t = time.perf_counter()
    with ThreadPoolExecutor(args.concurrent) as pool:
        conc = list(pool.map(bench.create_start, reqs))
    wall = (time.perf_counter() - t) * 1000
    target = bench.ids[0]
    execs = [timed(lambda: bench.rt.ExecSync(api_pb2.ExecSyncRequest(
        container_id=target, cmd=["true"], timeout=30), timeout=60)) for _ in range(args.execs)]
    while len(bench.ids) < args.scale:
        bench.create_start(bench.request())
    time.sleep(1)
    lists = [timed(lambda: bench.rt.ListContainers(api_pb2.ListContainersRequest()))
             for _ in range(50)]
    stats = [timed(lambda: bench.rt.ListContainerStats(api_pb2.ListContainerStatsRequest()))
             for _ in range(10)]
    monitors = conmon_pids(str(base))
    rss = [kib(p, "VmRSS") for p in monitors]
    pss = [kib(p, "Pss", "smaps_rollup") for p in monitors]
    daemon_rss = kib(daemon_pid, "VmRSS")
    removal = [bench.stop_remove(cid) for cid in list(bench.ids)]
    return {
        "create": summary(create), "start": summary(start), "create_start": summary(both),
        "create_start_concurrent": {**summary([c + s for c, s in conc]),
                                    "wall_ms": round(wall, 1)},
        "exec_sync_true": summary(execs),
        "running_containers": len(monitors),
        "list_containers": summary(lists),
        "list_container_stats": summary(stats),
        "conmon_rss_kib_mean": round(statistics.mean(rss)) if rss else None,
        "conmon_pss_kib_mean": round(statistics.mean(pss)) if pss else None,
        "daemon_rss_mib_with_containers": round(daemon_rss / 1024, 1),
        "stop0_remove": summary(removal),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20, help="sequential create+start")
    ap.add_argument("--concurrent", type=int, default=10)
    ap.add_argument("--execs", type=int, default=50)
    ap.add_argument("--scale", type=int, default=100, help="running containers for List*")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    from tests.integration.registry import start_registry

    info = build_image("busybox")
    with tempfile.TemporaryDirectory(prefix="crib-bench-ctr-") as tmp:
        base = Path(tmp)
        with start_registry(base / "registry") as reg:
            push_all(reg.address, [info])
            proc, ch = start_daemon(base / "crib", NET, image_toml(base / "crib", reg.address))
            bench: Bench | None = None
            sandbox_id = ""
            try:
                images = api_pb2_grpc.ImageServiceStub(ch)
                image = images.PullImage(api_pb2.PullImageRequest(
                    image=api_pb2.ImageSpec(image=info.reference(reg.address))),
                    timeout=120).image_ref
                pod = api_pb2.PodSandboxConfig(
                    metadata=api_pb2.PodSandboxMetadata(name="bench", uid="bench-uid",
                                                        namespace="bench"),
                    hostname="bench", log_directory=str(base / "logs"),
                    linux=api_pb2.LinuxPodSandboxConfig(cgroup_parent=NET.cgroup_parent))
                rt = api_pb2_grpc.RuntimeServiceStub(ch)
                sandbox_id = rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=pod),
                                              timeout=120).pod_sandbox_id
                bench = Bench(ch, image, sandbox_id, pod)
                idle = kib(proc.pid, "VmRSS")
                result = {"daemon_rss_mib_idle": round(idle / 1024, 1),
                          **measure(bench, proc.pid, base, args)}
            finally:
                if bench is not None:
                    for cid in list(bench.ids):
                        bench.stop_remove(cid)
                if sandbox_id:
                    rt = api_pb2_grpc.RuntimeServiceStub(ch)
                    rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
                    rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(
                        pod_sandbox_id=sandbox_id))
                ch.close()
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(60)
                cleanup_host(base / "crib", NET)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
