"""A ContainerManager on real runc and conmon, without the daemon around it.

The image is a directory made from busybox-static (one "layer"); sandboxes are
READY records whose pods use the host's network, IPC and UTS namespaces, with
a real pod cgroup under a test-only parent `/crib-test-<token>` (the conmon
cgroup goes there too). Teardown removes whatever a failed test left and
reports it as a leak: processes, runtime state, mounts, cgroups.

Use the `cenv` fixture by importing it into a test module (and listing it in
`__all__`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from api import api_pb2
from cri.config import Config, HandlerConfig
from hack.testimages.rootfs import DEFAULT_PATH, GROUP, PASSWD, busybox_path
from runtimeservice.cgroups import CgroupManager, detect
from runtimeservice.container_images import ContainerImage, StaticImages
from runtimeservice.containers import ContainerManager
from runtimeservice.oci import OciRuntime
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.store import RecordStore

RUNC = shutil.which("runc") or "/usr/sbin/runc"
CONMON = "/usr/bin/conmon"
CRUN = shutil.which("crun") or "/usr/bin/crun"
BUSYBOX_IMAGE = "crib-test/busybox:latest"
T = TypeVar("T")


def busybox_layer(target: Path) -> Path:
    """A busybox root filesystem in `target` (applets as symlinks, users, groups)."""
    binary = busybox_path()
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "root", "home/app", "usr/bin", "var"):
        (target / d).mkdir(parents=True, exist_ok=True)
    os.chmod(target / "tmp", 0o1777)
    os.chown(target / "home/app", 1000, 1000)
    shutil.copy(binary, target / "bin" / "busybox")
    out = subprocess.run([str(binary), "--list"], check=True, capture_output=True, text=True)
    for name in out.stdout.split():
        if name != "busybox":
            (target / "bin" / name).symlink_to("busybox")
    (target / "etc" / "passwd").write_text(PASSWD)
    (target / "etc" / "group").write_text(GROUP)
    return target


def slow_conmon(path: Path, delay: float) -> Path:
    """A conmon that waits `delay` seconds first: one process, which keeps the
    container id in its argv and the daemon's pipes, then becomes conmon."""
    path.write_text(
        f"#!{sys.executable}\nimport os, sys, time\ntime.sleep({delay})\n"
        f"os.execv({CONMON!r}, [{CONMON!r}, *sys.argv[1:]])\n")
    path.chmod(0o755)
    return path


def image_config(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"Cmd": ["sh"], "Env": [DEFAULT_PATH]}
    config.update(extra)
    return {"architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": []}}


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll until true (a generous limit, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


async def await_until(predicate: Callable[[], Awaitable[bool] | bool], what: str,
                      timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class ContainerEnv:
    base: Path
    layer: Path
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    managers: list[ContainerManager] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cfg = Config(root=str(self.base / "root"), runroot=str(self.base / "run"))
        self.cfg.runtime.handlers = {"runc": HandlerConfig(path=RUNC),
                                     "crun": HandlerConfig(path=CRUN)}
        self.parent = f"/crib-test-{self.token}"
        self.cgroups = CgroupManager(detect())
        self.sandboxes: RecordStore[SandboxRecord] = RecordStore(
            self.base / "sandboxes", SandboxRecord, "pod sandbox")
        self.runtimes = {name: OciRuntime(name, h.path, self.cfg.handler(name).root)
                         for name, h in self.cfg.runtime.handlers.items()}
        self.image = ContainerImage(
            id="sha256:" + "b" * 64, config=image_config(), chain_ids=("sha256:" + "c" * 64,),
            repo_digests=("crib-test/busybox@sha256:" + "d" * 64,), repo_tags=(BUSYBOX_IMAGE,),
            layer_dirs=(self.layer,))
        self.images = StaticImages({BUSYBOX_IMAGE: self.image})
        self._pods = 0

    # -- building blocks

    def manager(self) -> ContainerManager:
        mgr = ContainerManager(self.cfg, self.sandboxes, self.images, self.runtime,
                               cgroups=self.cgroups, conmon_cgroup=f"{self.parent}/conmon")
        self.managers.append(mgr)
        return mgr

    @contextlib.asynccontextmanager
    async def started(self) -> AsyncIterator[ContainerManager]:
        """A started manager, closed at the end (its containers keep running)."""
        mgr = self.manager()
        await mgr.start()
        try:
            yield mgr
        finally:
            await mgr.close()

    def runtime(self, name: str) -> OciRuntime:
        return self.runtimes[name or self.cfg.runtime.default_handler]

    async def sandbox(self, name: str = "", handler: str = "", privileged: bool = False,
                      **labels: str) -> SandboxRecord:
        """A READY pod using the host's namespaces, with a real pod cgroup."""
        self._pods += 1
        name = name or f"pod{self._pods}"
        sid = secrets.token_hex(32)
        cgroup = f"{self.parent}/pod-{sid[:12]}"
        await self.cgroups.create(cgroup)
        logs = self.base / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        pod = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, namespace="test", uid=sid[:8]),
            log_directory=str(logs), labels=labels)
        opts = pod.linux.security_context.namespace_options
        opts.network = opts.ipc = api_pb2.NamespaceMode.NODE
        opts.pid = api_pb2.NamespaceMode.CONTAINER
        pod.linux.security_context.privileged = privileged
        rec = SandboxRecord(
            id=sid, config=pod.SerializeToString(), runtime_handler=handler,
            created_at=time.time_ns(), state=SandboxState.READY, fingerprint="",
            ns_dir="", pod_dir=str(self.base / "pods" / sid), run_dir="", shm="",
            cgroup=cgroup, cgroup_runc=cgroup)
        self.sandboxes.put(rec)
        return rec

    def config(self, name: str, args: list[str], *, log: bool = True, **kw: Any
               ) -> api_pb2.ContainerConfig:
        cfg = api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name),
            image=api_pb2.ImageSpec(image=BUSYBOX_IMAGE), args=args,
            log_path=f"{name}.log" if log else "", **kw)
        return cfg

    def request(self, sandbox: SandboxRecord, config: api_pb2.ContainerConfig
                ) -> api_pb2.CreateContainerRequest:
        return api_pb2.CreateContainerRequest(pod_sandbox_id=sandbox.id, config=config,
                                              sandbox_config=sandbox.pod_config())

    def log_file(self, sandbox: SandboxRecord, name: str) -> Path:
        return Path(sandbox.pod_config().log_directory) / f"{name}.log"

    def memory_file(self, cgroup: str, name: str) -> Path:
        mem = self.cgroups.layout.controller_dir("memory")
        assert mem is not None
        return mem / cgroup.strip("/") / name

    # -- leak checks

    def processes(self) -> list[tuple[int, str]]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                cgroups = Path(f"/proc/{entry}/cgroup").read_text()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            if str(self.base).encode() in cmdline or self.parent + "/" in cgroups:
                found.append((int(entry), cmdline.replace(b"\0", b" ").decode(errors="replace")))
        return found

    def mounts(self) -> list[str]:
        text = Path("/proc/self/mountinfo").read_text()
        return [line.split()[4] for line in text.splitlines()
                if line.split()[4].startswith(str(self.base))]

    def cgroup_dirs(self) -> list[Path]:
        return [d for d in (h / self.parent.strip("/") for h in self.cgroups.layout.hierarchies())
                if d.is_dir()]

    def leftovers(self, *, pods: bool = False) -> list[str]:
        """What containers left (pod cgroups count only with `pods`)."""
        problems = [f"process {p}: {c}" for p, c in self.processes()]
        problems += [f"mount {m}" for m in self.mounts()]
        for name, rt in self.runtimes.items():
            if os.path.isdir(rt.root) and os.listdir(rt.root):
                problems.append(f"{name} state {os.listdir(rt.root)}")
        for top in self.cgroup_dirs():
            for d in top.iterdir():
                if d.is_dir() and (pods or not d.name.startswith("pod-")):
                    problems.append(f"cgroup {d}")
        bundles = Path(self.cfg.root) / "containers"
        if bundles.is_dir():
            problems += [f"bundle {d}" for d in bundles.iterdir() if d.name != "records"]
        return problems

    def cleanup(self) -> list[str]:
        problems = self.leftovers(pods=False)
        for rt in self.runtimes.values():
            if os.path.isdir(rt.root):
                for cid in os.listdir(rt.root):
                    subprocess.run([rt.path, "--root", rt.root, "delete", "--force", cid],
                                   capture_output=True)
        for pid, _ in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.processes(), "leaked processes to die")
        for m in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        for top in self.cgroup_dirs():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                os.rmdir(dirpath)
        return problems


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_layer(tmp_path_factory.mktemp("busybox-layer"))


@pytest.fixture
def cenv(tmp_path: Path, busybox_rootfs: Path) -> Iterator[ContainerEnv]:
    env = ContainerEnv(tmp_path, busybox_rootfs)
    yield env
    problems = env.cleanup()
    assert not problems, problems
    assert not env.cgroup_dirs()


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())
