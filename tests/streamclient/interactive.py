"""An interactive exec/attach session, the same over SPDY and WebSocket: type
input, resize, read output as it comes, then collect the end."""

from __future__ import annotations

import json
from typing import Protocol

from tests.streamclient.commands import ExecResult, SpdyCommand, ws_collect
from tests.streamclient.ws_client import WsClient


class Session(Protocol):
    async def send(self, data: bytes) -> None: ...

    async def resize(self, width: int, height: int) -> None: ...

    async def read(self) -> bytes:
        """The next stdout bytes; b"" at the end."""
        ...

    async def finish(self) -> ExecResult: ...

    def abort(self) -> None: ...


class SpdySession:
    def __init__(self, cmd: SpdyCommand) -> None:
        self.cmd = cmd

    @classmethod
    async def open(cls, url: str, *, tty: bool, stdin: bool = True,
                   stderr: bool = False) -> SpdySession:
        return cls(await SpdyCommand.open(url, stdin=stdin, stderr=stderr, tty=tty))

    async def send(self, data: bytes) -> None:
        assert self.cmd.stdin is not None
        await self.cmd.stdin.write(data)

    async def resize(self, width: int, height: int) -> None:
        await self.cmd.send_resize(width, height)

    async def read(self) -> bytes:
        assert self.cmd.stdout is not None
        return await self.cmd.stdout.read()

    async def finish(self) -> ExecResult:
        return await self.cmd.collect()

    def abort(self) -> None:
        self.cmd.client.writer.transport.abort()


class WsSession:
    def __init__(self, ws: WsClient) -> None:
        self.ws = ws
        self.other: dict[int, bytes] = {}

    @classmethod
    async def open(cls, url: str, protocol: str = "v5.channel.k8s.io") -> WsSession:
        return cls(await WsClient.connect(url, [protocol]))

    async def send(self, data: bytes) -> None:
        await self.ws.send_channel(0, data)

    async def resize(self, width: int, height: int) -> None:
        await self.ws.send_channel(4, json.dumps({"Width": width, "Height": height}).encode())

    async def read(self) -> bytes:
        while (msg := await self.ws.recv_channel()) is not None:
            if msg[0] == 1 and msg[1]:
                return msg[1]
            self.other[msg[0]] = self.other.get(msg[0], b"") + msg[1]
        return b""

    async def finish(self) -> ExecResult:
        result = await ws_collect(self.ws)
        result.error = self.other.get(3, b"") + result.error
        result.stderr = self.other.get(2, b"") + result.stderr
        return result

    def abort(self) -> None:
        self.ws.abort()


async def read_until(session: Session, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = await session.read()
        if not chunk:
            raise AssertionError(f"output ended before {marker!r}; got {got!r}")
        got += chunk
    return got


async def wait_for_size(session: Session, rows: int, cols: int, attempts: int = 200) -> None:
    """Run `stty size` in the shell until it reports rows x cols (a resize
    reaches the terminal asynchronously, beside the typed input)."""
    seen = b""
    for i in range(attempts):
        mark = 7000 + i
        # The echo of the typed line shows "$((…))", only the output shows the number.
        await session.send(f"stty size; echo mark$(({mark}))\n".encode())
        seen = await read_until(session, f"mark{mark}".encode())
        if f"{rows} {cols}".encode() in seen:
            return
    raise AssertionError(f"the terminal never became {rows}x{cols}; last output {seen!r}")
