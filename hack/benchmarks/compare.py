"""crib against containerd on this machine, same work, same run: a table and JSON.

    hack/bench [--quick] [--json out.json]      (as root)

Starts a local registry (test images + a pause image for containerd), then
containerd and crib on private sockets, roots, cgroups and CNI networks,
drives both through one CRI client with interleaved iterations, prints
crib / containerd / ratio per metric, stops both, removes everything they
made and prints what it checked. A runtime that lacks an RPC gets
"n/a (UNIMPLEMENTED)" in that row; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from hack.benchmarks import procstat, scenarios
from hack.benchmarks.containerd import Containerd, push_pause_image
from hack.benchmarks.cri_client import CriClient, describe_error
from hack.benchmarks.cribd import Crib
from hack.benchmarks.host import HostGuard, kill_and_wait, pids_with_marker
from hack.benchmarks.report import CONTAINERD, Metric, format_table, write_json
from hack.benchmarks.runtime import BenchRuntime
from hack.benchmarks.scenarios import Side
from hack.testimages import build_images, push_all
from tests.integration.registry import Registry, start_registry

LOCK = Path("/tmp/crib-compare.lock")
BASE_PREFIX = "crib-compare-"
CRIB_NET = ("bench-crib0", "10.202.0.0/24")
CONTAINERD_NET = ("bench-ctd0", "10.201.0.0/24")


@dataclass(frozen=True)
class Plan:
    iterations: int
    warmup: int
    concurrent_rounds: int
    width: int
    exec_iterations: int
    relist_iterations: int
    pods: int
    per_pod: int
    steady_seconds: float
    pulls: int
    idle_wait: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            iterations=args.iterations or (5 if quick else 30),
            warmup=1 if quick else 2,
            concurrent_rounds=args.concurrent_rounds or (1 if quick else 5),
            width=10,
            exec_iterations=args.iterations or (10 if quick else 50),
            relist_iterations=args.iterations or (10 if quick else 50),
            pods=args.pods or (10 if quick else 50),
            per_pod=2,
            steady_seconds=args.steady_seconds or (10.0 if quick else 60.0),
            pulls=0 if args.skip_pull else (1 if quick else 2),
            idle_wait=2.0 if quick else 5.0,
        )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def single_run() -> Iterator[None]:
    """One benchmark at a time on a machine (the bridge names and cgroups are fixed)."""
    with LOCK.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another benchmark holds {LOCK}") from None
        try:
            yield
        finally:
            LOCK.unlink(missing_ok=True)


def _terminate_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def seed_registry(registry: Registry, with_big: bool) -> tuple[str, str, str]:
    """Push busybox (+ big) and the pause image; returns (busybox, big, pause) references."""
    names = ["busybox", "big"] if with_big else ["busybox"]
    images = build_images(names)
    push_all(registry.address, images)
    pause = push_pause_image(registry.address)
    busybox = images["busybox"].reference(registry.address)
    big = images["big"].reference(registry.address) if with_big else ""
    return busybox, big, pause


def prepull(side: Side, busybox: str, pause: str) -> None:
    try:
        if side.name == CONTAINERD:
            side.client.pull(pause)  # its pods need it; pulled before, as a node would have
        side.image = side.client.pull(busybox) or busybox
    except Exception as exc:  # the side's container rows say why
        side.image_note = describe_error(exc)


def idle_rss(sides: list[Side], key: str, label: str) -> Metric:
    m = Metric(key, label, "MiB")
    for side in sides:
        m.values[side.name] = side.runtime.daemon_rss_mib()
    return m


def run_plan(sides: list[Side], plan: Plan, busybox: str, big: str, pause: str) -> list[Metric]:
    metrics: list[Metric] = []

    def step(title: str, fn: Callable[[], list[Metric]]) -> None:
        log(title)
        t = time.monotonic()
        try:
            rows = fn()
        except Exception as exc:  # a harness bug must not skip cleanup
            log(f"  {title} failed: {describe_error(exc)}")
            return
        for row in rows:
            for side, note in row.notes.items():
                if row.values.get(side) is None:
                    log(f"  {side}: {row.label}: {note}")
        metrics.extend(rows)
        log(f"  done in {time.monotonic() - t:.1f}s")

    time.sleep(plan.idle_wait)
    metrics.append(idle_rss(sides, "idle_rss_mib", "idle daemon RSS (fresh)"))
    log("pulling busybox (and pause for containerd)")
    for side in sides:
        prepull(side, busybox, pause)
        if side.image_note:
            log(f"  {side.name}: no busybox: {side.image_note}")
    n, w = plan.iterations, plan.warmup
    step("RunPodSandbox sequential + Stop/Remove",
         lambda: scenarios.pod_lifecycle(sides, n, w))
    step(f"RunPodSandbox x{plan.width} concurrent",
         lambda: scenarios.pod_concurrent(sides, plan.concurrent_rounds, plan.width, 1))
    step("container create+start / stop+remove",
         lambda: scenarios.container_lifecycle(sides, n, w))
    step("full pod start", lambda: scenarios.full_pod_start(sides, n, w))
    step("ExecSync", lambda: scenarios.exec_sync(sides, plan.exec_iterations, w))
    log(f"populating {plan.pods} pods x {plan.per_pod} containers per runtime")
    population = scenarios.populate(sides, plan.pods, plan.per_pod)
    try:
        step("relist", lambda: scenarios.relist(sides, population, plan.relist_iterations, w))
        step(f"steady load {plan.steady_seconds:g}s per runtime",
             lambda: scenarios.steady_load(sides, population, plan.steady_seconds))
    finally:
        scenarios.depopulate(sides)
    if plan.pulls and big:
        step("pull big", lambda: scenarios.pull(sides, big, "big image (~200 MiB, 9 layers)",
                                                plan.pulls))
    time.sleep(plan.idle_wait)
    metrics.append(idle_rss(sides, "idle_rss_after_mib", "idle daemon RSS (after the run)"))
    return metrics


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else ""


def metadata(runtimes: list[BenchRuntime], plan: Plan) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "runc": _tool_version(["/usr/sbin/runc", "--version"]),
        "conmon": _tool_version(["/usr/bin/conmon", "--version"]),
        "versions": {r.name: r.version_info() for r in runtimes},
        "plan": plan.__dict__,
        "order": "interleaved per iteration: crib, containerd",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hack/bench",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small N, 10 s steady load")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("--iterations", type=int, help="samples per latency metric")
    ap.add_argument("--concurrent-rounds", type=int, help="rounds of 10 concurrent pods")
    ap.add_argument("--pods", type=int, help="pods on the populated node (2 containers each)")
    ap.add_argument("--steady-seconds", type=float, help="length of the steady load")
    ap.add_argument("--skip-pull", action="store_true", help="no big-image pull")
    ap.add_argument("--logs", type=Path, help="copy the daemons' logs into this directory")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("hack/bench: run as root", file=sys.stderr)
        return 1
    plan = Plan.from_args(args)
    _terminate_on_sigterm()
    with single_run():
        return _run(plan, args.json, args.logs)


def _run(plan: Plan, json_path: Path | None, logs: Path | None) -> int:
    _clean_stale()
    base = Path(tempfile.mkdtemp(prefix=BASE_PREFIX))
    runtimes = _runtimes(base)
    guard = HostGuard([r.owned() for r in runtimes])
    guard.record()
    registry: Registry | None = None
    sides: list[Side] = []
    metrics: list[Metric] = []
    meta: dict[str, Any] = {}
    try:
        log(f"base directory {base}")
        registry = start_registry(base / "registry")
        log(f"registry on {registry.address}; building/pushing images")
        busybox, big, pause = seed_registry(registry, with_big=plan.pulls > 0)
        down: dict[str, str] = {}
        for rt in runtimes:
            log(f"starting {rt.name}")
            try:
                rt.prepare(registry.address, pause)
                rt.start()
            except Exception as exc:  # the other runtime is still measured
                down[rt.name] = f"did not start: {exc}".splitlines()[0]
                log(f"{rt.name} {down[rt.name]}\n{rt.log_tail(15)}")
                continue
            sides.append(Side(rt.name, rt, CriClient(rt.name, rt.socket, rt.pod_logs,
                                                     rt.cgroup_root)))
        meta = metadata(runtimes, plan)
        if sides:
            metrics = run_plan(sides, plan, busybox, big, pause)
        for m in metrics:
            for name, note in down.items():
                m.values[name] = None
                m.notes[name] = note
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
    except Exception:
        log(f"benchmark failed:\n{traceback.format_exc()}")
    finally:
        problems = _teardown(sides, runtimes, registry, guard, base, logs)
    if metrics:
        print()
        print(format_table(metrics))
        if json_path is not None:
            meta["cleanup_problems"] = problems
            write_json(json_path, metrics, meta)
            log(f"wrote {json_path}")
    return 1 if problems or not metrics else 0


def _runtimes(base: Path) -> list[BenchRuntime]:
    return [Crib(base / "crib", *CRIB_NET), Containerd(base / "containerd", *CONTAINERD_NET)]


def _clean_stale() -> None:
    """What a killed earlier run left (we hold the lock, so no other run is live)."""
    bases = [p for p in Path(tempfile.gettempdir()).glob(BASE_PREFIX + "*") if p.is_dir()]
    for b in bases:  # the registry (and anything else) started from that run
        kill_and_wait(pids_with_marker(str(b)))
    owned = [r.owned() for b in bases or [Path("/nonexistent")] for r in _runtimes(b)]
    for line in HostGuard(owned).clean():
        log(f"stale from an earlier run: {line}")
    for b in bases:
        log(f"removed {b}, left by an earlier run")
        shutil.rmtree(b, ignore_errors=True)
    containerd_alive = any(p.comm == "containerd" for p in procstat.scan())
    for shared in (Path("/run/containerd"), Path("/var/lib/cni")):
        # made by that run's containerd and shims; removed when nothing is left in them
        if bases and not containerd_alive and shared.is_dir() and not any(
                not f.is_dir() for f in shared.rglob("*")):
            shutil.rmtree(shared, ignore_errors=True)


def _teardown(sides: list[Side], runtimes: list[BenchRuntime], registry: Registry | None,
              guard: HostGuard, base: Path, logs: Path | None) -> list[str]:
    log("cleaning up")
    problems: list[str] = []
    for side in sides:
        for err in side.client.release_all() + side.client.sweep():
            log(f"warning: {err} (the host cleanup below removes it)")
        side.client.close()
    for rt in runtimes:
        if rt.proc is not None:
            code = rt.stop()
            if code not in (0, None, -signal.SIGTERM):
                log(f"{rt.name} exited with {code}; log tail:\n{rt.log_tail(10)}")
    if registry is not None:
        registry.stop()
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        for rt in runtimes:
            if rt.log_path.exists():
                shutil.copy(rt.log_path, logs / rt.log_path.name)
    for err in guard.clean():
        log(f"cleanup: {err}")
    shutil.rmtree(base, ignore_errors=True)
    checks = guard.verify()
    checks.append((not base.exists(), f"{base} removed"))
    print("\nmachine left as found:", file=sys.stderr)
    for ok, what in checks:
        print(f"  {'ok  ' if ok else 'LEFT'} {what}", file=sys.stderr)
    problems += [what for ok, what in checks if not ok]
    for p in problems:
        log(f"problem: {p}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
