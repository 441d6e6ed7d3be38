"""The streaming server's backend for real containers and sandboxes.

`ContainerStreamingBackend` implements `cri.streaming.backend.StreamingBackend`
on the container and sandbox records: exec runs the runtime in the
foreground (`streaming_exec`), attach joins conmon's attach socket
(`streaming_attach`), port-forward connects inside the sandbox's pinned
network namespace (the host's for a host-network pod).

The same checks guard the URL (in the RPC handlers) and its use (here): the
container must be running, the sandbox ready, when the client connects too,
since a URL stays valid for a while.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from cri.errors import FailedPrecondition
from cri.streaming.backend import StreamIO, TerminalSize
from runtimeservice.container import ContainerRecord, ContainerState
from runtimeservice.containers import ContainerManager
from runtimeservice.exec import exec_process, load_process
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.streaming_attach import attach_stream
from runtimeservice.streaming_exec import exec_stream

log = logging.getLogger(__name__)

# What a terminal session gets when the container's own environment names no terminal.
DEFAULT_TERM = "TERM=xterm"

SandboxLookup = Callable[[str], SandboxRecord]


def running_container(containers: ContainerManager, container_id: str,
                      action: str) -> ContainerRecord:
    """The container (id or unique prefix) if it is running; NotFound or FailedPrecondition."""
    rec = containers.get(container_id)
    if rec.state is not ContainerState.RUNNING:
        raise FailedPrecondition(
            f"cannot {action} container {rec.id}: it is {rec.state.value}, not running")
    return rec


def ready_sandbox(lookup: SandboxLookup, sandbox_id: str) -> SandboxRecord:
    """The sandbox (id or unique prefix) if it is ready; NotFound or FailedPrecondition."""
    rec = lookup(sandbox_id)
    if rec.state is not SandboxState.READY:
        raise FailedPrecondition(
            f"cannot port-forward to pod sandbox {rec.id}: it is {rec.state.value}, not ready")
    return rec


class ContainerStreamingBackend:
    """Exec, attach and port-forward targets for the streaming server."""

    def __init__(self, containers: ContainerManager, sandbox: SandboxLookup) -> None:
        self.containers = containers
        self.sandbox = sandbox

    async def exec(self, container_id: str, cmd: Sequence[str], io: StreamIO) -> int:
        rec = running_container(self.containers, container_id, "exec in")
        runtime = self.containers.runtime(rec.runtime_handler)
        base = await asyncio.to_thread(load_process, rec.bundle)
        env = [DEFAULT_TERM] if io.tty and not _has_term(base.get("env")) else []
        process = exec_process(base, list(cmd), tty=io.tty, env=env)
        code = await exec_stream(runtime, rec.id, process, io, work_dir=rec.persist_dir)
        log.info("exec in container %s: %s exited with %d", rec.id[:12], list(cmd), code)
        return code

    async def attach(self, container_id: str, io: StreamIO) -> None:
        rec = running_container(self.containers, container_id, "attach to")
        config = rec.container_config()
        monitor = self.containers.monitor

        async def resize(size: TerminalSize) -> None:
            await monitor.resize(rec.id, size.height, size.width)

        await attach_stream(monitor.attach_socket_path(rec.id), rec.id, io,
                            stdin=config.stdin, tty=config.tty, resize=resize)
        log.info("attach to container %s ended", rec.id[:12])

    async def port_forward_target(self, pod_sandbox_id: str) -> Path | None:
        rec = ready_sandbox(self.sandbox, pod_sandbox_id)
        return Path(rec.netns) if rec.netns else None


def _has_term(env: object) -> bool:
    return isinstance(env, list) and any(
        isinstance(e, str) and e.startswith("TERM=") for e in env)
