"""Client side of exec/attach and port-forward, over SPDY and WebSocket,
following client-go's order of operations."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from tests.streamclient.http_upgrade import upgrade
from tests.streamclient.spdy_client import ClientStream, SpdyClient
from tests.streamclient.ws_client import WsClient


@dataclass
class ExecResult:
    stdout: bytes = b""
    stderr: bytes = b""
    error: bytes = b""
    protocol: str = ""
    extra: dict[int, bytes] = field(default_factory=dict)

    @property
    def status(self) -> dict[str, Any] | None:
        return json.loads(self.error) if self.error else None

    @property
    def exit_code(self) -> int | None:
        st = self.status
        if st is None:
            return None
        if st["status"] == "Success":
            return 0
        if st.get("reason") == "NonZeroExitCode":
            for cause in st["details"]["causes"]:
                if cause.get("reason") == "ExitCode":
                    return int(cause["message"])
        return None


def spdy_headers(protocols: list[str]) -> list[tuple[str, str]]:
    return [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
            *(("X-Stream-Protocol-Version", p) for p in protocols)]


@dataclass
class SpdyCommand:
    """An open exec/attach session over SPDY; streams are None when not requested."""

    client: SpdyClient
    protocol: str
    error: ClientStream
    stdin: ClientStream | None
    stdout: ClientStream | None
    stderr: ClientStream | None
    resize: ClientStream | None

    @classmethod
    async def open(cls, url: str, *, stdin: bool = False, stdout: bool = True,
                   stderr: bool = True, tty: bool = False,
                   protocols: tuple[str, ...] = ("v4.channel.k8s.io",),
                   flow_control: bool = True, window: int = 65536,
                   ssl: object = None) -> SpdyCommand:
        up = await upgrade(url, spdy_headers(list(protocols)), ssl=ssl)
        if up.status != 101:
            raise ConnectionError(f"upgrade refused: {up.status} {up.body!r}")
        client = SpdyClient(up.reader, up.writer, up.leftover, flow_control=flow_control,
                            window=window)
        await client.start()
        protocol = up.header("x-stream-protocol-version") or ""
        error = await client.open_stream({"streamType": "error"})
        await error.close()
        streams: dict[str, ClientStream | None] = {}
        for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr),
                             ("resize", tty and protocol not in ("channel.k8s.io",
                                                                  "v2.channel.k8s.io"))):
            streams[name] = await client.open_stream({"streamType": name}) if wanted else None
        for name in ("stdout", "stderr"):
            s = streams[name]
            if s is not None:
                await s.close()
        return cls(client, protocol, error, streams["stdin"], streams["stdout"],
                   streams["stderr"], streams["resize"])

    async def send_resize(self, width: int, height: int) -> None:
        assert self.resize is not None
        await self.resize.write(json.dumps({"Width": width, "Height": height}).encode() + b"\n")

    async def collect(self) -> ExecResult:
        async def read(s: ClientStream | None) -> bytes:
            return b"" if s is None else await s.read_all()

        out, err, status = await asyncio.gather(read(self.stdout), read(self.stderr),
                                                read(self.error))
        await self.client.close()
        return ExecResult(out, err, status, self.protocol)


async def spdy_exec(url: str, *, stdin: bytes | None = None, stdout: bool = True,
                    stderr: bool = True, tty: bool = False,
                    resizes: tuple[tuple[int, int], ...] = (),
                    protocols: tuple[str, ...] = ("v4.channel.k8s.io",),
                    flow_control: bool = True, window: int = 65536) -> ExecResult:
    cmd = await SpdyCommand.open(url, stdin=stdin is not None, stdout=stdout, stderr=stderr,
                                 tty=tty, protocols=protocols, flow_control=flow_control,
                                 window=window)
    for w, h in resizes:
        await cmd.send_resize(w, h)

    async def feed() -> None:
        if cmd.stdin is not None and stdin is not None:
            await cmd.stdin.write(stdin)
            await cmd.stdin.close()

    # stdin is copied while the output is read, as client-go does: with
    # windows honoured, doing one after the other can deadlock.
    feeding = asyncio.create_task(feed())
    result = await cmd.collect()
    await feeding
    return result


async def ws_exec(url: str, *, stdin: bytes | None = None,
                  protocols: tuple[str, ...] = ("v5.channel.k8s.io",),
                  resizes: tuple[tuple[int, int], ...] = (),
                  close_stdin: bool = True) -> ExecResult:
    ws = await WsClient.connect(url, list(protocols))
    for w, h in resizes:
        await ws.send_channel(4, json.dumps({"Width": w, "Height": h}).encode())
    if stdin is not None:
        for i in range(0, len(stdin), 32768):
            await ws.send_channel(0, stdin[i:i + 32768])
        if close_stdin and ws.subprotocol.startswith("v5."):
            await ws.send_frame(0x2, bytes([255, 0]))
    return await ws_collect(ws)


async def ws_collect(ws: WsClient) -> ExecResult:
    result = ExecResult(protocol=ws.subprotocol)
    chunks: dict[int, bytearray] = {}
    while (msg := await ws.recv_channel()) is not None:
        chunks.setdefault(msg[0], bytearray()).extend(msg[1])
    await ws.close()
    result.stdout = bytes(chunks.pop(1, b""))
    result.stderr = bytes(chunks.pop(2, b""))
    result.error = bytes(chunks.pop(3, b""))
    result.extra = {k: bytes(v) for k, v in chunks.items()}
    return result


# ------------------------------------------------------------------ port-forward


async def spdy_portforward(url: str, *, flow_control: bool = True,
                           window: int = 65536) -> SpdyClient:
    up = await upgrade(url, spdy_headers(["portforward.k8s.io"]))
    if up.status != 101:
        raise ConnectionError(f"upgrade refused: {up.status} {up.body!r}")
    client = SpdyClient(up.reader, up.writer, up.leftover, flow_control=flow_control,
                        window=window)
    await client.start()
    return client


async def spdy_forward_streams(client: SpdyClient, port: int,
                               request_id: int) -> tuple[ClientStream, ClientStream]:
    """Open the (error, data) pair of one forwarded connection, as client-go does."""
    headers = {"streamType": "error", "port": str(port), "requestID": str(request_id)}
    error = await client.open_stream(headers)
    await error.close()
    data = await client.open_stream({**headers, "streamType": "data"})
    return error, data


async def spdy_request(client: SpdyClient, port: int, request_id: int,
                       payload: bytes) -> tuple[bytes, bytes]:
    """Send `payload`, half-close, read the reply: (data, error text)."""
    error, data = await spdy_forward_streams(client, port, request_id)
    await data.write(payload)
    await data.close()
    reply, err = await asyncio.gather(data.read_all(), error.read_all())
    return reply, err
