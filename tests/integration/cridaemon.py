"""Container tests through a real daemon: a daemon on the test CNI network that
pulls from the session's registry, and small CRI helpers.

`ctr_crib` (a fixture: import it, and `test_registry`/`pod_crib` come along)
starts such daemons; at teardown every container still listed is removed
through the API and the daemons' container directories, the conmon cgroup
and the runtime state are checked, before the sandbox fixtures check theirs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from api import api_pb2
from runtimeservice import cgroups
from runtimeservice.containers import DEFAULT_CONMON_CGROUP
from tests.integration.conftest import PodCrib, SeededRegistry
from tests.integration.daemon import Daemon
from tests.integration.test_sandbox_run import pod_config

CtrCrib = Callable[..., Daemon]


def image_toml(base: Path, registry: SeededRegistry) -> str:
    conf = base / "registries.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("")
    (base / "registries.conf.d").mkdir(exist_ok=True)
    return ("\n[image]\n"
            f"registries_conf = '{conf}'\n"
            f"registries_conf_dir = '{base / 'registries.conf.d'}'\n"
            f"insecure_registries = ['{registry.address}']\n")


def container_leftovers(d: Daemon) -> list[str]:
    found: list[str] = []
    bundles = d.root / "containers"
    if bundles.is_dir():
        found += [f"bundle {p}" for p in bundles.iterdir() if p.name != "records"]
        found += [f"record {p}" for p in (bundles / "records").glob("*.json")]
    run = d.runroot / "containers"
    if run.is_dir():
        found += [f"run dir {p}" for p in run.iterdir()]
    # The conmon cgroup is shared by every crib on the machine (other test runs
    # may be using it): what must be gone is this daemon's monitors in it.
    for h in cgroups.detect().hierarchies():
        procs = h / DEFAULT_CONMON_CGROUP.strip("/") / "cgroup.procs"
        try:
            pids = procs.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(d.base).encode() in cmdline:
                found.append(f"conmon {pid} still in {procs.parent}")
    return found


@pytest.fixture
def ctr_crib(tmp_path: Path, pod_crib: PodCrib, test_registry: SeededRegistry
             ) -> Iterator[CtrCrib]:
    started: list[Daemon] = []

    def start(name: str = "crib", extra_config: str = "") -> Daemon:
        d = pod_crib(name, image_toml(tmp_path / name, test_registry) + extra_config)
        started.append(d)
        return d

    yield start
    problems: list[str] = []
    for d in started:
        if d.proc is None or d.proc.poll() is not None or d.channel is None:
            continue
        for c in d.runtime.ListContainers(api_pb2.ListContainersRequest()).containers:
            d.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=c.id),
                                      timeout=60)
        problems += container_leftovers(d)
    assert problems == [], problems


# ---------------------------------------------------------------- CRI helpers


def pull(d: Daemon, ref: str) -> str:
    req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
    return str(d.images.PullImage(req, timeout=120).image_ref)


def sandbox(d: Daemon, name: str, handler: str = "", **kw: Any
            ) -> tuple[str, api_pb2.PodSandboxConfig]:
    config = pod_config(name, **kw)
    config.log_directory = str(d.base / "logs" / name)
    req = api_pb2.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return d.runtime.RunPodSandbox(req, timeout=60).pod_sandbox_id, config


def container_config(name: str, image: str, args: list[str] | None = None,
                     **kw: Any) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name), image=api_pb2.ImageSpec(image=image),
        args=args or [], log_path=f"{name}/0.log", **kw)


def create(d: Daemon, sandbox_id: str, pod: api_pb2.PodSandboxConfig,
           config: api_pb2.ContainerConfig, timeout: float = 60) -> str:
    req = api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=config,
                                         sandbox_config=pod)
    return str(d.runtime.CreateContainer(req, timeout=timeout).container_id)


def start(d: Daemon, cid: str) -> None:
    d.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=60)


def stop(d: Daemon, cid: str, timeout: int = 0) -> None:
    d.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=timeout),
                            timeout=timeout + 60)


def remove(d: Daemon, cid: str) -> None:
    d.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid), timeout=60)


def status(d: Daemon, cid: str) -> api_pb2.ContainerStatus:
    req = api_pb2.ContainerStatusRequest(container_id=cid)
    return d.runtime.ContainerStatus(req, timeout=10).status


def info(d: Daemon, cid: str) -> dict[str, Any]:
    req = api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)
    return dict(json.loads(d.runtime.ContainerStatus(req, timeout=10).info["info"]))


def exec_sync(d: Daemon, cid: str, cmd: list[str], timeout: int = 30
              ) -> api_pb2.ExecSyncResponse:
    req = api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=timeout)
    return d.runtime.ExecSync(req, timeout=timeout + 30)


def listed(d: Daemon, flt: api_pb2.ContainerFilter | None = None) -> list[str]:
    req = api_pb2.ListContainersRequest(filter=flt) if flt else api_pb2.ListContainersRequest()
    return [c.id for c in d.runtime.ListContainers(req, timeout=10).containers]


def wait_state(d: Daemon, cid: str, state: int, limit: float = 30) -> api_pb2.ContainerStatus:
    """Poll until the container is in `state` (a generous limit, not a timing check)."""
    deadline = time.monotonic() + limit
    while True:
        st = status(d, cid)
        if st.state == state or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    raise AssertionError("the call succeeded")
