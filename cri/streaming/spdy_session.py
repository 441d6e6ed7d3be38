"""A server-side SPDY/3.1 session on an upgraded HTTP connection: streams, their
half-closes and resets, PING replies, GOAWAY, and flow control.

The client opens every stream (SYN_STREAM, odd ids); the session hands each
new stream to `on_stream`, which must answer it at once with `reply()` (a
SYN_REPLY) or `reset()`, because clients create their streams one after the
other and wait for each reply.

Flow control (SPDY/3.1 section 2.6.8). Receiving: every stream starts with a
window of `receive_window` bytes (announced by SETTINGS when it is not the
default 64 KiB) and the session with 64 KiB; as the consumer reads, the
session sends WINDOW_UPDATE frames for the stream and for the session once
half a window has been consumed. Sending: data never exceeds the smaller of
the stream's and the session's send windows, which start at the peer's
initial window and grow with its WINDOW_UPDATEs.

The clients people actually use (client-go's and the kubelet's, through
moby/spdystream) implement none of this: they never send WINDOW_UPDATE and
ignore ours, relying on TCP for backpressure. A server that waited for their
window updates would stall every stream after 64 KiB. So in the default
`FlowControl.AUTO` mode the peer's windows are honoured once it has shown it
does flow control (a WINDOW_UPDATE, or SETTINGS with an initial window); when
a window runs out before that, the session waits `flow_control_grace`
seconds for a first WINDOW_UPDATE and, if none comes, stops enforcing the
peer's windows for the rest of the session. `STRICT` always honours them,
`OFF` never does. On the receiving side, a peer that overruns our window is
tolerated unless the mode is STRICT (RST_STREAM FLOW_CONTROL_ERROR); the
session simply stops reading from the socket while one stream has more than
`buffer_high_water` bytes waiting for its consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from cri.streaming import spdy
from cri.streaming.buffers import InboundBuffer, StreamResetError

log = logging.getLogger(__name__)


class FlowControl(Enum):
    STRICT = "strict"
    AUTO = "auto"
    OFF = "off"


@dataclass(frozen=True)
class SessionOptions:
    receive_window: int = spdy.DEFAULT_WINDOW
    flow_control: FlowControl = FlowControl.AUTO
    flow_control_grace: float = 0.1
    max_data_frame: int = 64 * 1024
    buffer_high_water: int = 256 * 1024
    # After GOAWAY, how long to wait for the client to close its side.
    linger: float = 2.0


class SpdyStream:
    """One stream of a session: a byte pipe in each direction."""

    def __init__(self, session: SpdySession, stream_id: int, headers: Mapping[str, str],
                 peer_window: int) -> None:
        self.session = session
        self.id = stream_id
        self.headers = dict(headers)
        self.replied = False
        self.local_closed = False
        self.remote_closed = False
        self.is_reset = False
        self.send_window = peer_window
        self.recv_window = session.options.receive_window
        self._unacked = 0
        self.inbound = InboundBuffer(session.options.buffer_high_water, self._consumed)

    def __repr__(self) -> str:
        return f"<SpdyStream {self.id} {self.headers.get('streamtype', '')}>"

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    # ---- answering a new stream

    def reply(self, headers: Mapping[str, str] | None = None) -> None:
        if self.replied or self.is_reset:
            return
        self.replied = True
        self.session.send_frame(spdy.SynReply(self.id, headers or {}))

    def reset(self, status: spdy.RstStatus = spdy.RstStatus.CANCEL) -> None:
        if self.is_reset or (self.local_closed and self.remote_closed):
            return
        self.session.send_frame(spdy.RstStream(self.id, status))
        self._mark_reset(StreamResetError(f"stream {self.id} reset by us ({status.name})"))

    # ---- reading

    async def read(self, n: int = 65536) -> bytes:
        """Up to `n` bytes; b"" once the peer half-closed the stream."""
        return await self.inbound.read(n)

    def discard_input(self) -> None:
        self.inbound.discard()

    # ---- writing

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            allowance = await self.session.send_allowance(self)
            n = min(len(view), allowance, self.session.options.max_data_frame)
            chunk = bytes(view[:n])
            view = view[n:]
            self.send_window -= n
            self.session.send_window -= n
            self.session.send_raw(spdy.encode_data(self.id, chunk))
            await self.session.drain()

    async def close(self) -> None:
        """Half-close: an empty DATA frame with FIN."""
        if self.local_closed or self.is_reset:
            return
        self._check_open()
        self.local_closed = True
        self.session.send_raw(spdy.encode_data(self.id, b"", fin=True))
        self.session.forget_if_done(self)
        await self.session.drain()

    # ---- internals used by the session

    def _check_open(self) -> None:
        if self.is_reset:
            raise StreamResetError(f"stream {self.id} was reset")
        if self.session.is_closed:
            raise StreamResetError(f"the connection of stream {self.id} is closed")
        if self.local_closed:
            raise StreamResetError(f"stream {self.id} is closed for writing")

    def _mark_reset(self, exc: StreamResetError) -> None:
        self.is_reset = True
        self.inbound.set_exception(exc)
        self.session.forget(self)
        self.session.notify_window()

    def _remote_fin(self) -> None:
        self.remote_closed = True
        self.inbound.feed_eof()
        self.session.forget_if_done(self)

    def _consumed(self, n: int) -> None:
        self.session.consumed(n)
        if self.remote_closed or self.is_reset:
            return
        self._unacked += n
        if self._unacked >= self.session.options.receive_window // 2:
            self.recv_window += self._unacked
            self.session.send_frame(spdy.WindowUpdate(self.id, self._unacked))
            self._unacked = 0


StreamHandler = Callable[[SpdyStream], None]


class SpdySession:
    """Server side of one SPDY/3.1 connection. `start()` it, then `close()` it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_stream: StreamHandler, options: SessionOptions | None = None,
                 initial_data: bytes = b"") -> None:
        self.options = options or SessionOptions()
        self._reader = reader
        self._writer = writer
        self._on_stream = on_stream
        self._encoder = spdy.Encoder()
        self._decoder = spdy.Decoder()
        self._initial = initial_data
        self._streams: dict[int, SpdyStream] = {}
        self._last_remote_id = 0
        self._going_away = False
        self._closing = False
        self.is_closed = False
        self.peer_flow_control: bool | None = None
        self._peer_initial_window = spdy.DEFAULT_WINDOW
        self.send_window = spdy.DEFAULT_WINDOW
        self._session_unacked = 0
        self._window_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    # ---- lifecycle

    def start(self) -> None:
        if self.options.receive_window != spdy.DEFAULT_WINDOW:
            self.send_frame(spdy.Settings((spdy.Setting(
                spdy.SettingId.INITIAL_WINDOW_SIZE, self.options.receive_window),)))
        self._task = asyncio.create_task(self._run(), name="spdy-session")

    async def close(self, status: spdy.GoAwayStatus = spdy.GoAwayStatus.OK,
                    linger: float | None = None) -> None:
        """Reset unfinished streams, send GOAWAY, let the client close (for up to
        `linger` seconds, the option by default), then close."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self._going_away = True
        for stream in list(self._streams.values()):
            stream.reset(spdy.RstStatus.CANCEL)
        self.send_frame(spdy.GoAway(self._last_remote_id, status))
        with contextlib.suppress(ConnectionError, OSError):
            await self.drain()
            if self._writer.can_write_eof():
                self._writer.write_eof()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task),
                                       self.options.linger if linger is None else linger)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._teardown()

    async def wait_closed(self) -> None:
        await self.closed.wait()

    # ---- sending (all writes happen on the event loop, in call order)

    def send_raw(self, data: bytes) -> None:
        if self.is_closed or self._writer.is_closing():
            raise StreamResetError("the SPDY connection is closed")
        self._writer.write(data)

    def send_frame(self, frame: spdy.Frame) -> None:
        """Encode and queue a frame; a no-op once the connection is gone."""
        if self.is_closed or self._writer.is_closing():
            return
        self._writer.write(self._encoder.encode(frame))

    async def drain(self) -> None:
        await self._writer.drain()

    def _enforcing(self) -> bool:
        mode = self.options.flow_control
        if mode is FlowControl.OFF:
            return False
        return mode is FlowControl.STRICT or self.peer_flow_control is not False

    async def send_allowance(self, stream: SpdyStream) -> int:
        """How many bytes `stream` may send now; waits for window if needed."""
        while True:
            stream._check_open()
            if not self._enforcing():
                return self.options.max_data_frame
            avail = min(stream.send_window, self.send_window)
            if avail > 0:
                return avail
            event = self._window_event
            if self.options.flow_control is FlowControl.AUTO and self.peer_flow_control is None:
                try:
                    await asyncio.wait_for(event.wait(), self.options.flow_control_grace)
                except TimeoutError:
                    if self.peer_flow_control is None:
                        log.debug("SPDY peer sent no WINDOW_UPDATE; not enforcing its windows")
                        self.peer_flow_control = False
            else:
                await event.wait()

    def notify_window(self) -> None:
        self._window_event.set()
        self._window_event = asyncio.Event()

    # ---- bookkeeping used by streams

    def consumed(self, n: int) -> None:
        self._session_unacked += n
        if self._session_unacked >= spdy.DEFAULT_WINDOW // 2:
            self.send_frame(spdy.WindowUpdate(0, self._session_unacked))
            self._session_unacked = 0

    def forget(self, stream: SpdyStream) -> None:
        self._streams.pop(stream.id, None)

    def forget_if_done(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed:
            self.forget(stream)

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    # ---- the reader loop

    async def _run(self) -> None:
        try:
            if self._initial:
                self._decoder.feed(self._initial)
                self._initial = b""
            while True:
                while (frame := self._next_frame()) is not None:
                    await self._dispatch(frame)
                data = await self._reader.read(256 * 1024)
                if not data:
                    break
                self._decoder.feed(data)
        except spdy.SpdyProtocolError as exc:
            log.info("SPDY session error: %s", exc)
            self.send_frame(spdy.GoAway(self._last_remote_id, spdy.GoAwayStatus.PROTOCOL_ERROR))
        except (ConnectionError, OSError) as exc:
            log.debug("SPDY connection lost: %s", exc)
        except Exception:
            log.exception("SPDY session failed")
        finally:
            self._teardown()

    def _next_frame(self) -> spdy.Frame | None:
        while True:
            try:
                return self._decoder.next_frame()
            except spdy.SpdyProtocolError as exc:
                if exc.stream_id == 0:
                    raise
                log.debug("SPDY stream error: %s", exc)
                self._last_remote_id = max(self._last_remote_id, exc.stream_id)
                self._reset_id(exc.stream_id, exc.status)

    def _reset_id(self, stream_id: int, status: spdy.RstStatus) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.reset(status)
        else:
            self.send_frame(spdy.RstStream(stream_id, status))

    async def _dispatch(self, f: spdy.Frame) -> None:
        if isinstance(f, spdy.DataFrame):
            await self._on_data(f)
        elif isinstance(f, spdy.SynStream):
            self._on_syn_stream(f)
        elif isinstance(f, spdy.RstStream):
            stream = self._streams.get(f.stream_id)
            if stream is not None:
                stream._mark_reset(StreamResetError(
                    f"stream {f.stream_id} reset by the peer (status {f.status})"))
        elif isinstance(f, spdy.WindowUpdate):
            self._on_window_update(f)
        elif isinstance(f, spdy.Settings):
            self._on_settings(f)
        elif isinstance(f, spdy.Ping):
            if f.id % 2 == 1:  # the client's ping; even ids would be replies to ours
                self.send_frame(f)
        elif isinstance(f, spdy.GoAway):
            self._going_away = True
        elif isinstance(f, spdy.Headers):
            stream = self._streams.get(f.stream_id)
            if stream is not None and f.fin:
                stream._remote_fin()
        elif isinstance(f, spdy.SynReply):
            self._reset_id(f.stream_id, spdy.RstStatus.PROTOCOL_ERROR)

    def _on_syn_stream(self, f: spdy.SynStream) -> None:
        sid = f.stream_id
        if sid in self._streams:
            self._reset_id(sid, spdy.RstStatus.STREAM_IN_USE)
            return
        if sid % 2 == 0:
            self.send_frame(spdy.RstStream(sid, spdy.RstStatus.PROTOCOL_ERROR))
            return
        if sid <= self._last_remote_id:
            raise spdy.SpdyProtocolError(
                f"stream id {sid} is not above the last one ({self._last_remote_id})")
        self._last_remote_id = sid
        if self._going_away:
            self.send_frame(spdy.RstStream(sid, spdy.RstStatus.REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, f.headers, self._peer_initial_window)
        self._streams[sid] = stream
        if f.unidirectional:
            stream.local_closed = True
        if f.fin:
            stream._remote_fin()
        try:
            self._on_stream(stream)
        except Exception:
            log.exception("stream handler failed for %r", stream)
            stream.reset(spdy.RstStatus.INTERNAL_ERROR)

    async def _on_data(self, f: spdy.DataFrame) -> None:
        stream = self._streams.get(f.stream_id)
        if stream is None or stream.remote_closed:
            self.consumed(len(f.data))
            if stream is None and f.stream_id > self._last_remote_id:
                self.send_frame(spdy.RstStream(f.stream_id, spdy.RstStatus.INVALID_STREAM))
            elif stream is not None:
                stream.reset(spdy.RstStatus.STREAM_ALREADY_CLOSED)
            return
        stream.recv_window -= len(f.data)
        if stream.recv_window < 0 and self.options.flow_control is FlowControl.STRICT:
            self.consumed(len(f.data))
            stream.reset(spdy.RstStatus.FLOW_CONTROL_ERROR)
            return
        stream.inbound.feed(f.data)
        if f.fin:
            stream._remote_fin()
        await stream.inbound.wait_below_high_water()

    def _on_window_update(self, f: spdy.WindowUpdate) -> None:
        self.peer_flow_control = True
        if f.stream_id == 0:
            self.send_window += f.delta
            if self.send_window > spdy.MAX_WINDOW:
                raise spdy.SpdyProtocolError("session window overflow")
        else:
            stream = self._streams.get(f.stream_id)
            if stream is None:
                return
            stream.send_window += f.delta
            if stream.send_window > spdy.MAX_WINDOW:
                stream.reset(spdy.RstStatus.FLOW_CONTROL_ERROR)
        self.notify_window()

    def _on_settings(self, f: spdy.Settings) -> None:
        window = f.get(spdy.SettingId.INITIAL_WINDOW_SIZE)
        if window is None:
            return
        self.peer_flow_control = True
        delta = window - self._peer_initial_window
        self._peer_initial_window = window
        for stream in self._streams.values():
            stream.send_window += delta
        self.notify_window()

    def _teardown(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for stream in list(self._streams.values()):
            stream.inbound.set_exception(StreamResetError(
                f"the connection of stream {stream.id} closed"))
        self._streams.clear()
        self.notify_window()
        with contextlib.suppress(Exception):
            self._writer.close()
        self.closed.set()
