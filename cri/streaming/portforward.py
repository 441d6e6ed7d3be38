"""Port-forward: TCP connections to a port inside the pod's network namespace.

SPDY (``portforward.k8s.io``). Each forwarded connection is a pair of streams
the client opens with the same ``requestID`` header (older clients send
none; the pair is then guessed from consecutive stream ids as the kubelet
does) and a ``port`` header: ``streamtype: error`` and ``streamtype: data``.
Many pairs share one session. Bytes are copied both ways; a FIN from the
client on the data stream becomes ``shutdown(SHUT_WR)`` on the socket and the
socket's EOF becomes a FIN on the data stream, so half-closed protocols work.
When both directions are done the error stream is closed; a failure is
written on it as text first.

WebSocket (``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io`` or none). The
ports come from the PortForward request (or the ``port`` query parameters);
port n gets data channel 2n and error channel 2n+1, and the first message on
each carries the port as two little-endian bytes. There is no half-close:
a port is done when the pod side closes, the connection when all are.

Connecting. `dial_in_netns` creates the socket in a short-lived thread that
has joined the pod's network namespace (a socket stays in the namespace it was
created in) and connects it from the event loop: to 127.0.0.1, then to [::1]
if that is refused. A host-network pod (no namespace) is reached on the
host's loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cri.errors import CribError
from cri.streaming.buffers import StreamResetError, shutting_down
from cri.streaming.remotecommand import Reader, Writer
from cri.streaming.spdy_session import SessionOptions, SpdySession, SpdyStream
from cri.streaming.websocket import ChannelWebSocket

log = logging.getLogger(__name__)

SPDY_PROTOCOLS = ("portforward.k8s.io",)
WEBSOCKET_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io")

# Once the pod has closed its side, how long the client may still send.
HALF_CLOSE_GRACE = 1.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Dialer = Callable[[int], Awaitable[Connection]]


# ------------------------------------------------------------------ dialing


def _new_sockets() -> list[socket.socket]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM)]
    with contextlib.suppress(OSError):  # IPv6 may be disabled in the namespace
        socks.append(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    for s in socks:
        s.setblocking(False)
    return socks


async def dial_in_netns(netns: Path | None, port: int) -> Connection:
    """Connect to localhost:`port` inside `netns` (the host's when None)."""
    if netns is None:
        socks = _new_sockets()
    else:
        from runtimeservice.namespaces import NamespaceKind, run_in_namespaces

        socks = await run_in_namespaces({NamespaceKind.NET: netns}, _new_sockets)
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    try:
        for sock in list(socks):
            addr = ("127.0.0.1", port) if sock.family == socket.AF_INET else ("::1", port)
            try:
                await loop.sock_connect(sock, addr)
            except OSError as exc:
                errors.append(f"{addr[0]}: {exc.strerror or exc}")
                continue
            socks.remove(sock)
            try:
                return await asyncio.open_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
    finally:
        for sock in socks:
            sock.close()
    where = f"inside network namespace {netns}" if netns else "on the host"
    raise ConnectionRefusedError(errno.ECONNREFUSED,
                                 f"cannot connect to localhost:{port} {where} "
                                 f"({'; '.join(errors)})")


# ------------------------------------------------------------------ copying


async def _to_socket(source: Reader, writer: asyncio.StreamWriter, half_close: bool) -> None:
    while chunk := await source.read(256 * 1024):
        writer.write(chunk)
        await writer.drain()
    if half_close and writer.can_write_eof():
        writer.write_eof()


async def _from_socket(reader: asyncio.StreamReader, sink: Writer, half_close: bool) -> None:
    while chunk := await reader.read(256 * 1024):
        await sink.write(chunk)
    if half_close:
        await sink.close()


async def forward(dial: Dialer, port: int, data_in: Reader, data_out: Writer,
                  error: Writer, describe: str, half_close: bool = True) -> None:
    """Connect and copy until done; a failure is written on `error`."""
    message = ""
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await dial(port)
        up = asyncio.create_task(_to_socket(data_in, writer, half_close))
        down = asyncio.create_task(_from_socket(reader, data_out, half_close))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up.done() and up.exception() is None:
                await down            # the client is done sending: the pod decides the end
            elif down.done() and down.exception() is None and half_close:
                # The pod is done sending. Clients (client-go) wait for the error
                # stream to close before they close their side, so theirs only
                # gets a grace period (as containerd does).
                await asyncio.wait({up}, timeout=HALF_CLOSE_GRACE)
            for t in (up, down):
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
    except StreamResetError as exc:
        log.debug("port-forward %s: client side ended: %s", describe, exc)
    except (OSError, CribError) as exc:
        text = exc.message if isinstance(exc, CribError) else (exc.strerror or str(exc))
        message = f"error forwarding port {port} to {describe}: {text}"
        log.info("%s", message)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    with contextlib.suppress(ConnectionError):
        if message:
            await error.write(message.encode("utf-8"))
        if half_close:
            await data_out.close()
        await error.close()


# ------------------------------------------------------------------ SPDY


@dataclass
class _Pair:
    request_id: str
    data: SpdyStream | None = None
    error: SpdyStream | None = None
    timer: asyncio.TimerHandle | None = None
    pending: list[str] = field(default_factory=list)


class SpdyPortForward:
    """The stream handler of a port-forward SPDY session."""

    def __init__(self, dial: Dialer, describe: str, creation_timeout: float) -> None:
        self.dial = dial
        self.describe = describe
        self.creation_timeout = creation_timeout
        self.pairs: dict[str, _Pair] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream(self, stream: SpdyStream) -> None:
        port_text = stream.header("port") or ""
        kind = stream.header("streamType")
        problem = None
        if not port_text:
            problem = '"port" header is required'
        elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
            problem = f"invalid port {port_text!r}"
        elif kind not in ("data", "error"):
            problem = f"invalid stream type {kind!r}"
        if problem:
            log.info("port-forward: refusing stream %d: %s", stream.id, problem)
            stream.reset()
            return
        stream.reply()
        rid = stream.header("requestID") or str(
            stream.id if kind == "error" else stream.id - 2)
        pair = self.pairs.get(rid)
        if pair is None:
            pair = self.pairs[rid] = _Pair(rid)
            pair.timer = asyncio.get_running_loop().call_later(
                self.creation_timeout, self._expire, rid)
        if getattr(pair, str(kind)) is not None:
            self._complain(pair, f"error processing stream for request {rid}: "
                                 f"{kind} stream already assigned")
            stream.reset()
            return
        if kind == "error":
            stream.discard_input()
            pair.error = stream
        else:
            pair.data = stream
        if pair.data is not None and pair.error is not None:
            del self.pairs[rid]
            if pair.timer is not None:
                pair.timer.cancel()
            task = asyncio.create_task(forward(
                self.dial, int(port_text), pair.data, pair.data, pair.error, self.describe))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _complain(self, pair: _Pair, message: str) -> None:
        log.info("port-forward: %s", message)
        if pair.error is not None:
            task = asyncio.create_task(pair.error.write(message.encode()))
            self.tasks.add(task)
            task.add_done_callback(self._quiet_done)

    def _quiet_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so never "exception was never retrieved"

    def _expire(self, rid: str) -> None:
        pair = self.pairs.pop(rid, None)
        if pair is None:
            return
        self._complain(pair, f"timed out waiting for the streams of request {rid}")
        for s in (pair.data, pair.error):
            if s is not None:
                s.reset()

    async def shutdown(self) -> None:
        for pair in self.pairs.values():
            if pair.timer is not None:
                pair.timer.cancel()
        self.pairs.clear()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve_spdy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     leftover: bytes, dial: Dialer, describe: str, creation_timeout: float,
                     session_options: SessionOptions | None = None) -> None:
    handler = SpdyPortForward(dial, describe, creation_timeout)
    session = SpdySession(reader, writer, handler.on_stream, session_options, leftover)
    session.start()
    try:
        await session.wait_closed()
    finally:
        await handler.shutdown()
        await session.close(linger=0 if shutting_down() else None)


# ------------------------------------------------------------------ WebSocket


async def _all(tasks: Sequence[asyncio.Task[None]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve_websocket(ws: ChannelWebSocket, ports: Sequence[int], dial: Dialer,
                          describe: str) -> None:
    chans = ws.open_channels([(True, True), (False, True)] * len(ports))
    tasks = []
    try:
        for i, port in enumerate(ports):
            data, error = chans[2 * i], chans[2 * i + 1]
            tag = struct.pack("<H", port)
            await data.write(tag)
            await error.write(tag)
            tasks.append(asyncio.create_task(
                forward(dial, port, data, data, error, describe, half_close=False)))
        closed = asyncio.create_task(ws.closed.wait())
        finished = asyncio.create_task(_all(tasks))
        await asyncio.wait({closed, finished}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        finished.cancel()
    except ConnectionError as exc:
        log.info("port-forward WebSocket client went away: %s", exc)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close(linger=0 if shutting_down() else None)
