"""A SPDY/3.1 client session, written from draft-mbelshe-httpbis-spdy-00 and
the SPDY/3.1 flow-control amendment.

`flow_control=True` behaves as the specification asks (windows honoured,
WINDOW_UPDATE sent as data is read, SETTINGS announcing a non-default
window). `flow_control=False` behaves like moby/spdystream, the library behind
kubectl and the kubelet: it never sends WINDOW_UPDATE and ignores windows.
Any overrun of our receive windows by the server is recorded in `violations`.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib

from tests.streamclient.spdy_dictionary import SPDY3_DICTIONARY

DEFAULT_WINDOW = 65536
CONTROL_BIT = 1 << 31
# control frame type numbers
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9)
FIN = 1
CANCEL = 5


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _nv_block(headers: dict[str, str]) -> bytes:
    out = bytearray(_u32(len(headers)))
    for name, value in headers.items():
        for text in (name.lower(), value):
            raw = text.encode()
            out += _u32(len(raw)) + raw
    return bytes(out)


def _parse_nv(block: bytes) -> dict[str, str]:
    count = int.from_bytes(block[:4], "big")
    pos, out = 4, {}
    for _ in range(count):
        n = int.from_bytes(block[pos:pos + 4], "big")
        name = block[pos + 4:pos + 4 + n].decode()
        pos += 4 + n
        n = int.from_bytes(block[pos:pos + 4], "big")
        out[name] = block[pos + 4:pos + 4 + n].decode()
        pos += 4 + n
    if pos != len(block):
        raise ValueError(f"header block has {len(block) - pos} extra bytes")
    return out


class ClientStream:
    def __init__(self, session: SpdyClient, sid: int, headers: dict[str, str]) -> None:
        self.session = session
        self.id = sid
        self.headers = headers
        self.replied = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.fin_received = False
        self.reset_status: int | None = None
        self.changed = asyncio.Event()
        self.send_window = session.peer_initial_window
        self.recv_window = session.window
        self.unacked = 0
        self.fin_sent = False

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def read(self, n: int = 65536) -> bytes:
        while not self.buf:
            if self.fin_received:
                return b""  # a reset after the FIN loses nothing (as in spdystream)
            if self.reset_status is not None:
                raise ConnectionResetError(f"stream {self.id} reset ({self.reset_status})")
            if self.session.lost:
                return b""
            await self.changed.wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.session._consumed(self, len(data))
        return data

    async def read_all(self) -> bytes:
        out = bytearray()
        while chunk := await self.read():
            out += chunk
        return bytes(out)

    async def write(self, data: bytes, chunk: int = 16384) -> None:
        pos = 0
        while pos < len(data):
            n = min(chunk, len(data) - pos)
            if self.session.flow_control:
                while min(self.send_window, self.session.send_window) <= 0:
                    if self.reset_status is not None or self.session.lost:
                        raise ConnectionResetError(f"stream {self.id} is gone")
                    await self.session.window_changed_wait()
                n = min(n, self.send_window, self.session.send_window)
            if self.reset_status is not None:
                raise ConnectionResetError(f"stream {self.id} reset ({self.reset_status})")
            self.send_window -= n
            self.session.send_window -= n
            await self.session._data(self.id, data[pos:pos + n], False)
            pos += n

    async def close(self) -> None:
        if not self.fin_sent:
            self.fin_sent = True
            await self.session._data(self.id, b"", True)

    async def reset(self, status: int = CANCEL) -> None:
        await self.session._control(RST_STREAM, 0, _u32(self.id) + _u32(status))
        self.reset_status = status
        self._wake()


class SpdyClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 leftover: bytes = b"", *, window: int = DEFAULT_WINDOW,
                 flow_control: bool = True, announce_window: bool = False) -> None:
        self.reader, self.writer = reader, writer
        self.pending = leftover
        self.window = window
        self.flow_control = flow_control
        self.announce = flow_control and (announce_window or window != DEFAULT_WINDOW)
        self.peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW
        self.session_recv = DEFAULT_WINDOW
        self.session_unacked = 0
        self.streams: dict[int, ClientStream] = {}
        self.next_id = 1
        self.deflate = zlib.compressobj(9, zlib.DEFLATED, 15, zdict=SPDY3_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
        self.lock = asyncio.Lock()
        self.violations: list[str] = []
        self.goaway: tuple[int, int] | None = None
        self.pings: list[int] = []
        self.resets: list[tuple[int, int]] = []
        self.settings: dict[int, int] = {}
        self.lost = False
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.announce:
            entry = (7).to_bytes(4, "big") + _u32(self.window)  # flags 0, id 7
            await self._control(SETTINGS, 0, _u32(1) + entry)
        self.task = asyncio.create_task(self._read_loop())

    def _wake_all(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for s in self.streams.values():
            s._wake()

    async def window_changed_wait(self) -> None:
        await self._changed.wait()

    # ---- writing

    async def _send(self, raw: bytes) -> None:
        async with self.lock:
            self.writer.write(raw)
            await self.writer.drain()

    async def _control(self, ftype: int, flags: int, payload: bytes) -> None:
        head = _u32(CONTROL_BIT | (3 << 16) | ftype) + _u32((flags << 24) | len(payload))
        await self._send(head + payload)

    async def _data(self, sid: int, data: bytes, fin: bool) -> None:
        await self._send(_u32(sid) + _u32(((FIN if fin else 0) << 24) | len(data)) + data)

    def _compress(self, headers: dict[str, str]) -> bytes:
        return self.deflate.compress(_nv_block(headers)) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    async def open_stream(self, headers: dict[str, str], timeout: float = 10) -> ClientStream:
        async with self.lock:  # ids and compression order must match the wire order
            sid = self.next_id
            self.next_id += 2
            stream = ClientStream(self, sid, headers)
            self.streams[sid] = stream
            body = _u32(sid) + _u32(0) + bytes([0, 0]) + self._compress(headers)
            head = _u32(CONTROL_BIT | (3 << 16) | SYN_STREAM) + _u32(len(body))
            self.writer.write(head + body)
            await self.writer.drain()
        await asyncio.wait_for(stream.replied, timeout)
        return stream

    async def ping(self, pid: int = 1) -> None:
        await self._control(PING, 0, _u32(pid))

    async def send_raw(self, raw: bytes) -> None:
        await self._send(raw)

    async def send_syn_stream(self, sid: int, headers: dict[str, str]) -> None:
        """A SYN_STREAM with a chosen id (to provoke protocol errors)."""
        async with self.lock:
            body = _u32(sid) + _u32(0) + bytes([0, 0]) + self._compress(headers)
            self.writer.write(_u32(CONTROL_BIT | (3 << 16) | SYN_STREAM) + _u32(len(body)) + body)
            await self.writer.drain()

    def _consumed(self, stream: ClientStream, n: int) -> None:
        if not self.flow_control or self.lost or self.goaway is not None:
            return  # (after GOAWAY our sending side is shut: the data is all there)
        stream.unacked += n
        self.session_unacked += n
        updates = []
        if stream.unacked >= self.window // 2 and not stream.fin_received:
            updates.append((stream.id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0
        if self.session_unacked >= DEFAULT_WINDOW // 2:
            updates.append((0, self.session_unacked))
            self.session_recv += self.session_unacked
            self.session_unacked = 0
        for sid, delta in updates:
            head = _u32(CONTROL_BIT | (3 << 16) | WINDOW_UPDATE) + _u32(8)
            self.writer.write(head + _u32(sid) + _u32(delta))

    # ---- reading

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self._read_exactly(8)
                word, rest = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
                flags, length = rest >> 24, rest & 0xFFFFFF
                payload = await self._read_exactly(length)
                if word & CONTROL_BIT:
                    self._on_control(word & 0xFFFF, flags, payload)
                else:
                    self._on_data(word & 0x7FFFFFFF, flags, payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.lost = True
            for s in self.streams.values():
                if not s.replied.done():
                    s.replied.set_exception(ConnectionResetError("connection closed"))
            self._wake_all()

    async def _read_exactly(self, n: int) -> bytes:
        if len(self.pending) >= n:
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        out, self.pending = self.pending, b""
        return out + await self.reader.readexactly(n - len(out))

    def _on_data(self, sid: int, flags: int, data: bytes) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            self.violations.append(f"data for unknown stream {sid}")
            return
        stream.recv_window -= len(data)
        self.session_recv -= len(data)
        if self.flow_control and stream.recv_window < 0:
            self.violations.append(f"stream {sid} window overrun by {-stream.recv_window}")
        if self.flow_control and self.session_recv < 0:
            self.violations.append(f"session window overrun by {-self.session_recv}")
        stream.buf += data
        if flags & FIN:
            stream.fin_received = True
        stream._wake()

    def _on_control(self, ftype: int, flags: int, p: bytes) -> None:
        sid = int.from_bytes(p[:4], "big") & 0x7FFFFFFF if len(p) >= 4 else 0
        if ftype == SYN_REPLY:
            stream = self.streams.get(sid)
            self.inflate.decompress(p[4:])  # keep the shared context in step
            if stream is not None and not stream.replied.done():
                stream.replied.set_result(None)
                if flags & FIN:
                    stream.fin_received = True
        elif ftype == RST_STREAM:
            self.resets.append((sid, int.from_bytes(p[4:8], "big")))
            self._wake_all()
            stream = self.streams.get(sid)
            if stream is not None:
                stream.reset_status = int.from_bytes(p[4:8], "big")
                if not stream.replied.done():
                    stream.replied.set_exception(ConnectionResetError(
                        f"stream {sid} refused with status {stream.reset_status}"))
                stream._wake()
        elif ftype == SETTINGS:
            count = int.from_bytes(p[:4], "big")
            for i in range(count):
                entry = p[4 + 8 * i:12 + 8 * i]
                key = int.from_bytes(entry[1:4], "big")
                self.settings[key] = int.from_bytes(entry[4:8], "big")
                if key == 7:
                    delta = self.settings[key] - self.peer_initial_window
                    self.peer_initial_window = self.settings[key]
                    for s in self.streams.values():
                        s.send_window += delta
            self._wake_all()
        elif ftype == WINDOW_UPDATE:
            delta = int.from_bytes(p[4:8], "big") & 0x7FFFFFFF
            if sid == 0:
                self.send_window += delta
            elif sid in self.streams:
                self.streams[sid].send_window += delta
            self._wake_all()
        elif ftype == PING:
            pid = int.from_bytes(p[:4], "big")
            self.pings.append(pid)
            self._wake_all()
            if pid % 2 == 0 and self.goaway is None:  # the server's: echo it (small: no drain)
                self.writer.write(_u32(CONTROL_BIT | (3 << 16) | PING) + _u32(4) + p)
        elif ftype == GOAWAY:
            self.goaway = (sid, int.from_bytes(p[4:8], "big"))
            if self.writer.can_write_eof():
                self.writer.write_eof()   # no new streams: we are done sending
            self._wake_all()
        elif ftype == HEADERS:
            self.inflate.decompress(p[4:])
        elif ftype == SYN_STREAM:
            self.violations.append("the server opened a stream")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
