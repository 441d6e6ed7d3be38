"""The seam between the streaming server and the containers.

The streaming server speaks the protocols; a `StreamingBackend` runs the
commands and says where to connect. Everything here is transport-neutral: the
same `StreamIO` reaches the backend whether the client came over SPDY or
WebSocket.

Contract of the backend:

- `exec` runs `cmd` in the container and returns its exit code once the
  process has exited AND everything it wrote has been passed to
  `io.stdout` / `io.stderr` (the server then half-closes those streams and
  sends the status). `io.stdin` returns b"" when the client closed its
  input: close the process's stdin then. With `io.tty` the process gets a
  terminal (stdout carries everything, stderr is None) and `io.resize`
  yields the client's terminal sizes (the first one typically right away).
- `attach` joins the container's main process the same way and returns when
  that process exits or its output ends.
- Both are *cancelled* (asyncio.CancelledError) when the client goes away
  mid-stream: the backend must then kill what it started (exec) or detach
  (attach) and release every file descriptor before re-raising.
- Failures before the command runs (unknown container, runtime error) are
  raised as `cri.errors.CribError` subclasses; the client receives them in
  the status on the error stream.
- `port_forward_target` names the network namespace to connect in: the pin
  file of the sandbox's netns, or None for a host-network pod.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class TerminalSize:
    width: int
    height: int


class InputStream(Protocol):
    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; b"" at end of input."""
        ...


class OutputStream(Protocol):
    async def write(self, data: bytes) -> None:
        """Send data; raises ConnectionError when the client is gone."""
        ...


@dataclass
class StreamIO:
    stdin: InputStream | None
    stdout: OutputStream | None
    stderr: OutputStream | None
    tty: bool
    resize: AsyncIterator[TerminalSize] | None


class StreamingBackend(Protocol):
    async def exec(self, container_id: str, cmd: Sequence[str], io: StreamIO) -> int:
        """Run cmd in the container; its exit code."""
        ...

    async def attach(self, container_id: str, io: StreamIO) -> None:
        """Attach to the container's main process until it exits."""
        ...

    async def port_forward_target(self, pod_sandbox_id: str) -> Path | None:
        """The sandbox's network namespace pin file; None for host network."""
        ...
