"""Helpers for streaming tests through a real daemon: URLs from its RPCs, a pod
with the busybox test image, and the checks that a scenario left nothing
behind in the daemon (children, descriptors, open sessions)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from api import api_pb2
from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import (
    CtrCrib,
    container_config,
    create,
    exec_sync,
    pull,
    sandbox,
    start,
)
from tests.integration.daemon import Daemon
from tests.streamclient.commands import spdy_exec

SUCCESS = {"metadata": {}, "status": "Success"}
# An ephemeral port, so that several daemons can run at once.
STREAMING = "\n[streaming]\nport = 0\n"
HTTP_PORT = 8080
BIG = 50 * 1024 * 1024
SMALL = 256 * 1024
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
    """Run a client coroutine; the timeout only guards against a hang."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---------------------------------------------------------------- the daemon's health


def daemon_fds(d: Daemon) -> set[str]:
    assert d.proc is not None
    found = set()
    for fd in os.listdir(f"/proc/{d.proc.pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{d.proc.pid}/fd/{fd}")
            if "pidfd" not in target:  # the container manager's watch on each monitor
                found.add(f"{fd} {target}")
    return found


def daemon_children(d: Daemon) -> list[str]:
    assert d.proc is not None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == d.proc.pid and fields[0] not in "ZX":
                found.append(stat[:80])
    return found


def processes_with(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if marker in cmdline:
                    found.append(f"{entry.name} {cmdline}")
    return found


def wait_for(predicate: Callable[[], bool], what: str, limit: float = 30) -> None:
    """Poll until true (a generous limit, not a timing check)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def streaming_sessions(d: Daemon, port: int) -> list[str]:
    """The daemon's open connections on its streaming port (the listener aside)."""
    inodes = {t.split("[")[1].rstrip("]") for t in (e.split(" ", 1)[1] for e in daemon_fds(d))
              if t.startswith("socket:[")}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] != "0A" and fields[9] in inodes:
                    found.append(line.strip())
    return found


def quiet(d: Daemon, port: int) -> None:
    """No streaming session left open in the daemon, no exec running."""
    wait_for(lambda: streaming_sessions(d, port) == [], "the streaming sessions to close")
    wait_for(lambda: daemon_children(d) == [], "the daemon's children to end")


@dataclass
class Baseline:
    d: Daemon
    port: int  # the streaming server's
    fds: set[str]

    def check(self) -> None:
        """Nothing left over: sessions closed, the runtime reaped, fds as before."""
        quiet(self.d, self.port)
        wait_for(lambda: daemon_fds(self.d) == self.fds,
                 f"the daemon's descriptors to be back: {daemon_fds(self.d) ^ self.fds}")
        assert self.d.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name


def baseline(d: Daemon, cid: str) -> Baseline:
    """The daemon's state once it has served one exec (lazy set-up done)."""
    url = exec_url(d, cid, ["true"])
    assert run(spdy_exec(url)).status == SUCCESS
    port = int(url.split("/")[2].rsplit(":", 1)[1])
    quiet(d, port)
    return Baseline(d, port, daemon_fds(d))


# ---------------------------------------------------------------- CRI helpers


def exec_url(d: Daemon, cid: str, cmd: list[str], *, stdin: bool = False,
             tty: bool = False) -> str:
    req = api_pb2.ExecRequest(container_id=cid, cmd=cmd, stdin=stdin, stdout=True,
                              stderr=not tty, tty=tty)
    return str(d.runtime.Exec(req, timeout=10).url)


def attach_url(d: Daemon, cid: str, *, stdin: bool = True, tty: bool = False) -> str:
    req = api_pb2.AttachRequest(container_id=cid, stdin=stdin, stdout=True, stderr=not tty,
                                tty=tty)
    return str(d.runtime.Attach(req, timeout=10).url)


def portforward_url(d: Daemon, sid: str, ports: tuple[int, ...] = ()) -> str:
    req = api_pb2.PortForwardRequest(pod_sandbox_id=sid, port=list(ports))
    return str(d.runtime.PortForward(req, timeout=10).url)


@dataclass
class Pod:
    d: Daemon
    sid: str
    config: api_pb2.PodSandboxConfig
    image: str

    def run(self, name: str, args: list[str], **kw: Any) -> str:
        cid = create(self.d, self.sid, self.config,
                     container_config(name, self.image, args, **kw))
        start(self.d, cid)
        return cid


def new_pod(ctr_crib: CtrCrib, registry: SeededRegistry, name: str = "streams",
            **pod_kw: Any) -> Pod:
    d = ctr_crib(extra_config=STREAMING)
    image = pull(d, registry.ref("busybox"))
    sid, config = sandbox(d, name, **pod_kw)
    return Pod(d, sid, config, image)


class DaemonUrls:
    """Streaming URLs from a daemon's Exec/Attach/PortForward RPCs (for kubeapi)."""

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def get_exec_url(self, req: api_pb2.ExecRequest) -> str:
        return str(self.d.runtime.Exec(req, timeout=10).url)

    def get_attach_url(self, req: api_pb2.AttachRequest) -> str:
        return str(self.d.runtime.Attach(req, timeout=10).url)

    def get_portforward_url(self, req: api_pb2.PortForwardRequest) -> str:
        return str(self.d.runtime.PortForward(req, timeout=10).url)


# ---------------------------------------------------------------- an HTTP server in a pod


def www(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "www"
    root.mkdir()
    digests = {}
    for name, size in (("big", BIG), ("small", SMALL)):
        data = os.urandom(size)
        (root / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return root, digests


def httpd(pod: Pod, root: Path, listen: str) -> str:
    mount = api_pb2.Mount(container_path="/www", host_path=str(root), readonly=True)
    cid = pod.run("httpd", ["httpd", "-f", "-p", listen, "-h", "/www"], mounts=[mount])
    port = listen.rsplit(":", 1)[-1]
    wait_for(lambda: exec_sync(pod.d, cid, ["wget", "-q", "-O", "/dev/null",
                                            f"http://127.0.0.1:{port}/small"]).exit_code == 0,
             "httpd to serve")
    return cid
