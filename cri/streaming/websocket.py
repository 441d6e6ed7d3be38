"""Kubernetes' channel protocols over WebSocket (RFC 6455, framed by wsproto).

Every message starts with one byte naming its channel (exec/attach: 0 stdin,
1 stdout, 2 stderr, 3 error, 4 resize; port-forward: 2n data and 2n+1 error
of the n-th port). The sub-protocol names the variant:

- ``v5.channel.k8s.io``: binary; the message ``[255, n]`` closes the client's
  side of channel n (so stdin can end without closing the connection);
- ``v4.channel.k8s.io`` / ``channel.k8s.io`` (and no sub-protocol at all):
  binary, no half-close; v4 carries a JSON status on the error channel;
- ``v4.base64.channel.k8s.io`` / ``base64.channel.k8s.io``: text messages,
  the channel as the ASCII digit, the payload base64-encoded.

wsproto does the handshake check and the framing (sans-IO: it turns bytes
into events and events into bytes); this module runs it on asyncio streams,
reassembles fragmented messages, answers pings and closes, and routes
payloads to per-channel buffers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from cri.streaming.buffers import InboundBuffer, StreamResetError

log = logging.getLogger(__name__)

CLOSE_CHANNEL = 255
MAX_MESSAGE = 64 * 1024       # largest payload we put in one message
MAX_INBOUND_MESSAGE = 16 * 1024 * 1024


class WebSocketRejected(Exception):
    """The upgrade cannot be accepted; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ChannelProtocol:
    name: str
    base64: bool = False
    close_signal: bool = False


def channel_protocol(name: str) -> ChannelProtocol:
    return ChannelProtocol(name, base64="base64." in name,
                           close_signal=name.startswith("v5."))


def negotiate(offered: Sequence[str], supported: Sequence[str]) -> str | None:
    """The first offered protocol we support ("" when none was offered)."""
    if not offered:
        return ""
    for p in offered:
        if p in supported:
            return p
    return None


class WsChannel:
    """One channel: a reader if the client may write to it, a writer if we may."""

    def __init__(self, conn: ChannelWebSocket, number: int, readable: bool,
                 writable: bool) -> None:
        self.conn = conn
        self.number = number
        self.readable = readable
        self.writable = writable
        self.inbound = InboundBuffer(conn.high_water)
        if not readable:
            self.inbound.discard()

    async def read(self, n: int = 65536) -> bytes:
        if not self.readable:
            return b""
        return await self.inbound.read(n)

    async def write(self, data: bytes) -> None:
        if not self.writable:
            return
        view = memoryview(data)
        while True:
            await self.conn.send_channel(self.number, bytes(view[:MAX_MESSAGE]))
            view = view[MAX_MESSAGE:]
            if not view:
                return

    async def close(self) -> None:
        """The channel protocols have no server-side half-close: nothing to send."""


class ChannelWebSocket:
    """A server WebSocket carrying numbered channels."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ws: WSConnection, protocol: ChannelProtocol,
                 high_water: int = 256 * 1024, linger: float = 2.0) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = ws
        self.protocol = protocol
        self.high_water = high_water
        self.linger = linger
        self.channels: dict[int, WsChannel] = {}
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._partial: list[bytes] = []
        self._partial_text: list[str] = []
        self._partial_size = 0

    # ---- handshake

    @classmethod
    def accept(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               headers: Iterable[tuple[bytes, bytes]], target: bytes,
               supported: Sequence[str], leftover: bytes = b"") -> ChannelWebSocket:
        """Answer the upgrade (101) with the negotiated sub-protocol, or raise
        WebSocketRejected (400 malformed handshake, 403 no common protocol)."""
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(headers), target)
            request = next((e for e in ws.events() if isinstance(e, Request)), None)
        except RemoteProtocolError as exc:
            raise WebSocketRejected(400, f"invalid WebSocket handshake: {exc}") from None
        if request is None:
            raise WebSocketRejected(400, "invalid WebSocket handshake")
        chosen = negotiate(request.subprotocols, supported)
        if chosen is None:
            raise WebSocketRejected(
                403, f"unable to upgrade: none of the requested sub-protocols "
                     f"{request.subprotocols} is supported; supported: {list(supported)}")
        writer.write(ws.send(AcceptConnection(subprotocol=chosen or None)))
        conn = cls(reader, writer, ws, channel_protocol(chosen))
        if leftover:
            ws.receive_data(leftover)
        return conn

    def open_channels(self, kinds: Sequence[tuple[bool, bool]]) -> list[WsChannel]:
        """Create channels 0..n-1 as (readable, writable) and start reading."""
        chans = [WsChannel(self, i, r, w) for i, (r, w) in enumerate(kinds)]
        self.channels = {c.number: c for c in chans}
        self._task = asyncio.create_task(self._run(), name="websocket")
        return chans

    # ---- sending

    async def send_channel(self, number: int, payload: bytes) -> None:
        if self.protocol.base64:
            text = chr(ord("0") + number) + base64.b64encode(payload).decode("ascii")
            await self._send(TextMessage(data=text))
        else:
            await self._send(BytesMessage(data=bytes([number]) + payload))

    async def _send(self, event: BytesMessage | TextMessage) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            raise StreamResetError("the WebSocket connection is closed")
        try:
            data = self._ws.send(event)
        except LocalProtocolError:
            raise StreamResetError("the WebSocket connection is closing") from None
        self._writer.write(data)
        await self._writer.drain()

    def _send_now(self, event: Event) -> None:
        if self._writer.is_closing():
            return
        with contextlib.suppress(LocalProtocolError):
            self._writer.write(self._ws.send(event))

    async def close(self, code: int = 1000, linger: float | None = None) -> None:
        """Send a close frame, wait a little for the client's, then hang up."""
        if self._ws.state is ConnectionState.OPEN:
            self._send_now(CloseConnection(code=code))
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.drain()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task),
                                       self.linger if linger is None else linger)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._teardown()

    # ---- receiving

    async def _run(self) -> None:
        try:
            await self._handle_events()
            while self._ws.state not in (ConnectionState.CLOSED, ConnectionState.REJECTING):
                data = await self._reader.read(256 * 1024)
                self._ws.receive_data(data or None)
                await self._handle_events()
                if not data:
                    break
        except RemoteProtocolError as exc:
            log.info("WebSocket protocol error: %s", exc)
            hint = exc.event_hint
            code = hint.code if isinstance(hint, CloseConnection) else 1002
            self._send_now(CloseConnection(code=code))
        except (ConnectionError, OSError) as exc:
            log.debug("WebSocket connection lost: %s", exc)
        except Exception:
            log.exception("WebSocket connection failed")
        finally:
            self._teardown()

    async def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                self._partial.append(bytes(event.data))
                self._partial_size += len(event.data)
                if event.message_finished:
                    message = b"".join(self._partial)
                    self._partial, self._partial_size = [], 0
                    await self._deliver(message)
            elif isinstance(event, TextMessage):
                self._partial_text.append(event.data)
                self._partial_size += len(event.data)
                if event.message_finished:
                    text = "".join(self._partial_text)
                    self._partial_text, self._partial_size = [], 0
                    await self._deliver_text(text)
            elif isinstance(event, Ping):
                self._send_now(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send_now(event.response())
                self._teardown()
            if self._partial_size > MAX_INBOUND_MESSAGE:
                raise RemoteProtocolError("message too large",
                                          event_hint=CloseConnection(code=1009))

    async def _deliver_text(self, text: str) -> None:
        if not text:
            return
        try:
            payload = base64.b64decode(text[1:].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            log.debug("dropping a message that is not base64 on channel %r", text[0])
            return
        await self._route(ord(text[0]) - ord("0"), payload)

    async def _deliver(self, message: bytes) -> None:
        if not message:
            return
        if self.protocol.base64:
            await self._deliver_text(message.decode("ascii", "replace"))
            return
        await self._route(message[0], message[1:])

    async def _route(self, number: int, payload: bytes) -> None:
        if number == CLOSE_CHANNEL and self.protocol.close_signal:
            if len(payload) == 1 and payload[0] in self.channels:
                self.channels[payload[0]].inbound.feed_eof()
            return
        channel = self.channels.get(number)
        if channel is None:
            log.debug("dropping a message for unknown channel %d", number)
            return
        channel.inbound.feed(payload)
        await channel.inbound.wait_below_high_water()

    def _teardown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for channel in self.channels.values():
            channel.inbound.set_exception(StreamResetError("the WebSocket connection closed"))
        with contextlib.suppress(Exception):
            self._writer.close()
