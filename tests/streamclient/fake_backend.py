"""A scripted StreamingBackend for protocol tests: commands are interpreted
here, in the test process, so the tests exercise only the protocol layer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cri.errors import NotFound
from cri.streaming.backend import StreamIO, TerminalSize


@dataclass
class Call:
    kind: str
    container_id: str
    cmd: list[str]
    tty: bool
    resizes: list[TerminalSize] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False


class FakeBackend:
    """Commands: echo ARGS | exit N | cat | wc | stderr TEXT | big N | stty-size |
    sleep | fail. Attach echoes stdin to stdout until stdin ends."""

    def __init__(self, netns: Path | None = None) -> None:
        self.calls: list[Call] = []
        self.netns = netns
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def exec(self, container_id: str, cmd: Sequence[str], io: StreamIO) -> int:
        call = Call("exec", container_id, list(cmd), io.tty)
        self.calls.append(call)
        self.started.set()
        try:
            code = await self._run(call, io)
            call.finished = True
            return code
        except asyncio.CancelledError:
            call.cancelled = True
            self.cancelled.set()
            raise

    async def attach(self, container_id: str, io: StreamIO) -> None:
        call = Call("attach", container_id, [], io.tty)
        self.calls.append(call)
        self.started.set()
        if container_id == "missing":
            raise NotFound(f"container {container_id} not found")
        try:
            await self._cat(io)
            call.finished = True
        except asyncio.CancelledError:
            call.cancelled = True
            self.cancelled.set()
            raise

    async def port_forward_target(self, pod_sandbox_id: str) -> Path | None:
        if pod_sandbox_id == "missing":
            raise NotFound(f"pod sandbox {pod_sandbox_id} not found")
        return self.netns

    async def _cat(self, io: StreamIO) -> int:
        assert io.stdin is not None and io.stdout is not None
        while chunk := await io.stdin.read():
            await io.stdout.write(chunk)
        return 0

    async def _run(self, call: Call, io: StreamIO) -> int:
        name, args = call.cmd[0], call.cmd[1:]
        if name == "echo":
            assert io.stdout is not None
            await io.stdout.write((" ".join(args) + "\n").encode())
            return 0
        if name == "exit":
            return int(args[0])
        if name == "cat":
            return await self._cat(io)
        if name == "wc":
            assert io.stdin is not None and io.stdout is not None
            total = 0
            while chunk := await io.stdin.read():
                total += len(chunk)
            await io.stdout.write(f"{total}\n".encode())
            return 0
        if name == "stderr":
            assert io.stderr is not None
            await io.stderr.write(" ".join(args).encode())
            return 1
        if name == "big":
            assert io.stdout is not None
            size = int(args[0])
            block = bytes(range(256)) * 256
            sent = 0
            while sent < size:
                piece = block[:min(len(block), size - sent)]
                await io.stdout.write(piece)
                sent += len(piece)
            return 0
        if name == "stty-size":
            assert io.resize is not None and io.stdout is not None
            async for size in io.resize:
                call.resizes.append(size)
                await io.stdout.write(f"{size.height} {size.width}\n".encode())
                if len(call.resizes) >= int(args[0] if args else 1):
                    break
            return 0
        if name == "sleep":
            await asyncio.Event().wait()
        if name == "fail":
            raise NotFound(f"container {call.container_id} not found")
        raise AssertionError(f"fake backend: unknown command {call.cmd}")
