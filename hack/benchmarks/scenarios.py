"""The measurements, each run on both runtimes through the same CriClient code.

Iterations are interleaved (crib, containerd, crib, containerd, ...) so drift
of the machine falls on both alike. A runtime that fails a scenario (an RPC
it does not implement yet, or any error) gets a note instead of numbers for
that scenario's rows; the pods it still held are given back and the other
runtime carries on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from api import api_pb2
from hack.benchmarks import procstat
from hack.benchmarks.cri_client import READY, CriClient, Pod, describe_error
from hack.benchmarks.report import Metric, latency_metrics
from hack.benchmarks.runtime import BenchRuntime

EXEC_CMD = ["/bin/true"]


@dataclass
class Side:
    """One runtime under test and what the scenarios need from it."""

    name: str
    runtime: BenchRuntime
    client: CriClient
    image: str = ""  # busybox as the runtime names it after the pull ("" = none)
    image_note: str = ""  # why there is no image


@dataclass
class Series:
    """Per-side samples of the rows one scenario fills, and per-side failure notes."""

    keys: Sequence[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, side: str, key: str, values: float | Sequence[float]) -> None:
        bucket = self.samples.setdefault(key, {}).setdefault(side, [])
        if isinstance(values, (int, float)):
            bucket.append(float(values))
        else:
            bucket.extend(float(v) for v in values)

    def fail(self, side: str, exc: BaseException | str) -> None:
        self.notes.setdefault(side, exc if isinstance(exc, str) else describe_error(exc))

    def ok(self, side: str) -> bool:
        return side not in self.notes

    def of(self, key: str) -> dict[str, list[float]]:
        return self.samples.get(key, {})


def interleave(iterations: int, names: Sequence[str]) -> Iterator[tuple[int, str]]:
    """(iteration, side) in the order A, B, A, B, ..."""
    for i in range(iterations):
        for name in names:
            yield i, name


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


Op = Callable[[Side, int], dict[str, float | list[float]]]


def run_interleaved(sides: Sequence[Side], keys: Sequence[str], iterations: int,
                    warmup: int, op: Op, needs_image: bool = False) -> Series:
    """Run `op` for every side, interleaved; warm-up iterations are not recorded."""
    series = Series(keys)
    by_name = {s.name: s for s in sides}
    if needs_image:
        for s in sides:
            if not s.image:
                series.fail(s.name, s.image_note or "no image")
    for i, name in interleave(warmup + iterations, [s.name for s in sides]):
        side = by_name[name]
        if not series.ok(name):
            continue
        try:
            result = op(side, i)
        except Exception as exc:  # any failure becomes the side's note
            series.fail(name, exc)
            side.client.release_all()
            continue
        if i >= warmup:
            for key, value in result.items():
                series.add(name, key, value)
    return series


# ---------------------------------------------------------------- pods


def pod_lifecycle(sides: Sequence[Side], n: int, warmup: int) -> list[Metric]:
    """RunPodSandbox alone, then StopPodSandbox + RemovePodSandbox, one pod at a time."""

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        config = side.client.pod_config(f"seq-{i}")
        t = time.perf_counter()
        pod = side.client.run_pod(config)
        run = ms_since(t)
        t = time.perf_counter()
        side.client.stop_remove_pod(pod)
        return {"run": run, "stop_remove": ms_since(t)}

    s = run_interleaved(sides, ("run", "stop_remove"), n, warmup, op)
    return (latency_metrics("run_pod_seq", "RunPodSandbox sequential", s.of("run"), s.notes)
            + latency_metrics("pod_stop_remove", "StopPodSandbox+RemovePodSandbox",
                              s.of("stop_remove"), s.notes))


def pod_concurrent(sides: Sequence[Side], rounds: int, width: int, warmup: int) -> list[Metric]:
    """`width` RunPodSandbox calls at once; each call's own latency is a sample."""

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        configs = [side.client.pod_config(f"conc-{i}-{j}") for j in range(width)]

        def timed(config: api_pb2.PodSandboxConfig) -> tuple[float, Pod | BaseException]:
            t = time.perf_counter()
            try:
                pod = side.client.run_pod(config)
            except Exception as exc:  # raised below, after cleanup
                return ms_since(t), exc
            return ms_since(t), pod

        with ThreadPoolExecutor(max_workers=width) as pool:
            results = list(pool.map(timed, configs))
        errors = [r for _, r in results if isinstance(r, BaseException)]
        for _, r in results:
            if isinstance(r, Pod):
                side.client.stop_remove_pod(r)
        if errors:
            raise errors[0]
        return {"run": [ms for ms, _ in results]}

    s = run_interleaved(sides, ("run",), rounds, warmup, op)
    return latency_metrics("run_pod_conc", f"RunPodSandbox {width} concurrent", s.of("run"),
                           s.notes)


# ---------------------------------------------------------------- containers


def _with_pod(side: Side, pods: dict[str, Pod], name: str) -> Pod:
    if side.name not in pods:
        pods[side.name] = side.client.run_pod(side.client.pod_config(name))
    return pods[side.name]


def container_lifecycle(sides: Sequence[Side], n: int, warmup: int) -> list[Metric]:
    """CreateContainer+StartContainer, then StopContainer+RemoveContainer, in one pod."""
    pods: dict[str, Pod] = {}

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        pod = _with_pod(side, pods, "ctr-lifecycle")
        t = time.perf_counter()
        cid = side.client.create_start(pod, f"c{i}", side.image)
        create = ms_since(t)
        if not side.client.wait_ready(pod, f"c{i}"):
            raise RuntimeError(f"container c{i} did not log {READY!r} (CRI log) within 10 s")
        t = time.perf_counter()
        side.client.stop_remove_container(pod, cid)
        return {"create_start": create, "stop_remove": ms_since(t)}

    try:
        s = run_interleaved(sides, ("create_start", "stop_remove"), n, warmup, op,
                            needs_image=True)
    finally:
        _release(sides, pods)
    return (latency_metrics("ctr_create_start", "CreateContainer+StartContainer",
                            s.of("create_start"), s.notes)
            + latency_metrics("ctr_stop_remove", "StopContainer+RemoveContainer",
                              s.of("stop_remove"), s.notes))


def full_pod_start(sides: Sequence[Side], n: int, warmup: int) -> list[Metric]:
    """RunPodSandbox + CreateContainer + StartContainer (image present): pod start latency."""

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        config = side.client.pod_config(f"full-{i}")
        t = time.perf_counter()
        pod = side.client.run_pod(config)
        side.client.create_start(pod, "app", side.image)
        total = ms_since(t)
        side.client.stop_remove_pod(pod)
        return {"start": total}

    s = run_interleaved(sides, ("start",), n, warmup, op, needs_image=True)
    return latency_metrics("full_pod_start", "full pod start (sandbox+create+start)",
                           s.of("start"), s.notes)


def exec_sync(sides: Sequence[Side], n: int, warmup: int) -> list[Metric]:
    """ExecSync of /bin/true in a running container."""
    pods: dict[str, Pod] = {}
    ctrs: dict[str, str] = {}

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        pod = _with_pod(side, pods, "exec")
        if side.name not in ctrs:
            ctrs[side.name] = side.client.create_start(pod, "app", side.image)
        t = time.perf_counter()
        code = side.client.exec_sync(ctrs[side.name], EXEC_CMD)
        took = ms_since(t)
        if code != 0:
            raise RuntimeError(f"ExecSync {EXEC_CMD} exited {code}")
        return {"exec": took}

    try:
        s = run_interleaved(sides, ("exec",), n, warmup, op, needs_image=True)
    finally:
        _release(sides, pods)
    return latency_metrics("exec_sync", "ExecSync /bin/true", s.of("exec"), s.notes,
                           quantiles=("p50",))


def _release(sides: Sequence[Side], pods: dict[str, Pod]) -> None:
    for side in sides:
        pod = pods.pop(side.name, None)
        if pod is not None:
            # On failure the pod stays with the client: release_all retries and reports.
            with contextlib.suppress(Exception):
                side.client.stop_remove_pod(pod)


# ---------------------------------------------------------------- a populated node


@dataclass
class Population:
    """`pods` pods x `per_pod` running containers per side, made for relist and load."""

    pods: int
    per_pod: int
    notes: dict[str, str] = field(default_factory=dict)


def populate(sides: Sequence[Side], pods: int, per_pod: int) -> Population:
    population = Population(pods, per_pod)
    for side in sides:
        if not side.image:
            population.notes[side.name] = side.image_note or "no image"
            continue
        try:
            for i in range(pods):
                pod = side.client.run_pod(side.client.pod_config(f"node-{i}"))
                for j in range(per_pod):
                    side.client.create_start(pod, f"c{j}", side.image)
        except Exception as exc:
            population.notes[side.name] = describe_error(exc)
            side.client.release_all()
    return population


def depopulate(sides: Sequence[Side]) -> None:
    for side in sides:
        side.client.release_all()


def relist(sides: Sequence[Side], population: Population, n: int, warmup: int) -> list[Metric]:
    """ListPodSandbox + ListContainers + ListContainerStats on the populated node."""
    want = (population.pods, population.pods * population.per_pod)

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        t = time.perf_counter()
        pods, ctrs, _ = side.client.relist()
        took = ms_since(t)
        if pods < want[0] or ctrs < want[1]:
            raise RuntimeError(f"relist saw {pods} pods/{ctrs} containers, want {want}")
        return {"relist": took}

    live = [s for s in sides if s.name not in population.notes]
    s = run_interleaved(live, ("relist",), n, warmup, op)
    notes = {**population.notes, **s.notes}
    label = f"relist {population.pods} pods x {population.per_pod} ctrs (list+list+stats)"
    return latency_metrics("relist", label, s.of("relist"), notes, quantiles=("p50", "p95"))


def steady_load(sides: Sequence[Side], population: Population, seconds: float) -> list[Metric]:
    """Relist + stats every second for `seconds`: runtime CPU, RSS and PSS, per side in turn."""
    tag = f"{population.pods}x{population.per_pod}, {seconds:g} s"
    rows = {
        "cpu": Metric("steady_cpu_s", f"steady load ({tag}): runtime CPU", "s"),
        "rss": Metric("steady_rss_mib", f"steady load ({tag}): runtime RSS", "MiB"),
        "pss": Metric("steady_pss_mib", f"steady load ({tag}): runtime PSS", "MiB"),
        "procs": Metric("steady_procs", f"steady load ({tag}): runtime processes", ""),
        "infra": Metric("steady_infra_rss_mib", f"steady load ({tag}): pod infra RSS", "MiB"),
    }
    for side in sides:
        note = population.notes.get(side.name)
        if note is None:
            try:
                values = _steady_one(side, seconds)
            except Exception as exc:
                note = describe_error(exc)
            else:
                for key, value in values.items():
                    rows[key].values[side.name] = value
        if note is not None:
            for row in rows.values():
                row.values[side.name] = None
                row.notes[side.name] = note
    return list(rows.values())


def _steady_one(side: Side, seconds: float) -> dict[str, float]:
    before = side.runtime.processes()
    rss: list[float] = []
    start = time.monotonic()
    tick = 0
    while True:
        tick += 1
        side.client.relist()
        now = side.runtime.processes()
        rss.append(procstat.rss_mib(now.runtime))
        next_at = start + tick
        if next_at - start > seconds:
            break
        time.sleep(max(0.0, next_at - time.monotonic()))
    after = side.runtime.processes()
    return {
        "cpu": procstat.cpu_delta(before.runtime, after.runtime),
        "rss": sum(rss) / len(rss),
        "pss": procstat.pss_mib(after.runtime),
        "procs": float(len(after.runtime)),
        "infra": procstat.rss_mib(after.infra),
    }


# ---------------------------------------------------------------- images


def pull(sides: Sequence[Side], image: str, label: str, n: int) -> list[Metric]:
    """Wall time of PullImage of `image` absent from the runtime (removed before and after)."""

    def op(side: Side, i: int) -> dict[str, float | list[float]]:
        _remove_quietly(side, image)
        t = time.perf_counter()
        side.client.pull(image)
        took = (time.perf_counter() - t)
        _remove_quietly(side, image)
        return {"pull": took}

    s = run_interleaved(sides, ("pull",), n, 0, op)
    return latency_metrics("pull_big", f"pull {label}", s.of("pull"), s.notes,
                           quantiles=("p50",), unit="s")


def _remove_quietly(side: Side, image: str) -> None:
    with contextlib.suppress(Exception):  # absent or not removable: the pull tells
        side.client.remove_image(image)
