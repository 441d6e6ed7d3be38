"""SPDY sessions against the independent client: flow control in both
directions, a peer that does no flow control (like moby/spdystream), resets,
pings, GOAWAY and protocol errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from cri.streaming import spdy
from cri.streaming.buffers import StreamResetError
from cri.streaming.spdy_session import FlowControl, SessionOptions, SpdySession, SpdyStream
from tests.streamclient.harness import run
from tests.streamclient.spdy_client import SpdyClient

PATTERN = bytes(range(256)) * 4096  # 1 MiB

Handler = Callable[[SpdyStream], Awaitable[None]]


class Server:
    """Runs `handler` for every stream the client opens."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.tasks: list[asyncio.Task[None]] = []
        self.errors: list[BaseException] = []

    def on_stream(self, stream: SpdyStream) -> None:
        stream.reply()
        self.tasks.append(asyncio.create_task(self._run(stream)))

    async def _run(self, stream: SpdyStream) -> None:
        try:
            await self.handler(stream)
        except Exception as exc:
            self.errors.append(exc)


@asynccontextmanager
async def connected(handler: Handler, options: SessionOptions | None = None,
                    **client_kw: Any) -> AsyncIterator[tuple[SpdySession, SpdyClient, Server]]:
    server = Server(handler)
    sessions: list[SpdySession] = []
    ready = asyncio.Event()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        session = SpdySession(r, w, server.on_stream, options)
        sessions.append(session)
        session.start()
        ready.set()
        await session.wait_closed()

    listener = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
    client = SpdyClient(r, w, **client_kw)
    await client.start()
    await ready.wait()
    try:
        yield sessions[0], client, server
    finally:
        await client.close()
        await sessions[0].close()
        for t in server.tasks:
            t.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        listener.close()
        await listener.wait_closed()


async def source(stream: SpdyStream) -> None:
    await stream.write(PATTERN)
    await stream.close()


received: dict[int, bytes] = {}


async def sink(stream: SpdyStream) -> None:
    data = bytearray()
    while chunk := await stream.read():
        data += chunk
    received[stream.id] = bytes(data)
    await stream.write(b"%d" % len(data))
    await stream.close()


def test_download_honours_a_small_client_window() -> None:
    async def main() -> None:
        async with connected(source, window=4096) as (session, client, server):
            stream = await client.open_stream({"streamType": "data"})
            assert await stream.read_all() == PATTERN
            assert client.violations == []
            assert session.peer_flow_control is True
            assert server.errors == []
    run(main())


def test_many_streams_share_the_session_window() -> None:
    async def main() -> None:
        async with connected(source, window=8192) as (_, client, server):
            streams = [await client.open_stream({"n": str(i)}) for i in range(20)]
            results = await asyncio.gather(*(s.read_all() for s in streams))
            assert all(r == PATTERN for r in results)
            assert client.violations == []
            assert server.errors == []
    run(main())


def test_upload_into_a_small_server_window() -> None:
    async def main() -> None:
        opts = SessionOptions(receive_window=4096, flow_control=FlowControl.STRICT)
        async with connected(sink, opts) as (_, client, server):
            stream = await client.open_stream({"streamType": "data"})
            await stream.write(PATTERN)
            await stream.close()
            assert await stream.read_all() == b"%d" % len(PATTERN)
            assert received[stream.id] == PATTERN
            assert client.settings[spdy.SettingId.INITIAL_WINDOW_SIZE] == 4096
            assert client.resets == [] and server.errors == []
    run(main())


def test_a_peer_without_flow_control_is_detected() -> None:
    """moby/spdystream never sends WINDOW_UPDATE: waiting for one would stall."""
    async def main() -> None:
        async with connected(source, flow_control=False) as (session, client, _):
            stream = await client.open_stream({"streamType": "stdout"})
            assert await stream.read_all() == PATTERN
            assert session.peer_flow_control is False
    run(main())


def test_strict_mode_waits_for_window_updates() -> None:
    async def main() -> None:
        size = 100 * 1024
        opts = SessionOptions(flow_control=FlowControl.STRICT)
        streams: list[SpdyStream] = []

        async def writer(stream: SpdyStream) -> None:
            streams.append(stream)
            await stream.write(PATTERN[:size])
            await stream.close()

        async with connected(writer, opts, flow_control=False) as (session, client, server):
            stream = await client.open_stream({})
            got = bytearray()
            while len(got) < spdy.DEFAULT_WINDOW:
                got += await stream.read()
            assert len(got) == spdy.DEFAULT_WINDOW
            assert streams[0].send_window == 0 and session.send_window == 0
            assert not server.tasks[0].done()
            wu = spdy.Encoder()
            await client.send_raw(wu.encode(spdy.WindowUpdate(stream.id, size)) +
                                  wu.encode(spdy.WindowUpdate(0, size)))
            got += await stream.read_all()
            assert bytes(got) == PATTERN[:size]
    run(main())


def test_overrunning_the_window_in_strict_mode_resets_the_stream() -> None:
    async def main() -> None:
        opts = SessionOptions(receive_window=4096, flow_control=FlowControl.STRICT)
        async with connected(sink, opts, flow_control=False) as (_, client, _server):
            stream = await client.open_stream({})
            await stream.write(PATTERN[:100 * 1024])
            while stream.reset_status is None:
                await stream.changed.wait()
            assert stream.reset_status == spdy.RstStatus.FLOW_CONTROL_ERROR
    run(main())


def test_ping_is_answered() -> None:
    async def main() -> None:
        async with connected(sink) as (_, client, _server):
            await client.ping(7)
            while 7 not in client.pings:
                await client.window_changed_wait()
    run(main())


def test_client_reset_fails_the_server_side_read() -> None:
    async def main() -> None:
        outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

        async def reader(stream: SpdyStream) -> None:
            try:
                await stream.read()
                await stream.read()
            except StreamResetError as exc:
                outcome.set_result(exc)

        async with connected(reader) as (_, client, _server):
            stream = await client.open_stream({})
            await stream.write(b"x")
            await stream.reset()
            assert "reset by the peer" in str(await outcome)
    run(main())


def test_protocol_errors_reset_only_the_stream() -> None:
    async def main() -> None:
        async with connected(sink) as (session, client, _server):
            # data on a stream never opened, then a stream id only a server may use
            await client.send_raw(spdy.encode_data(99, b"x"))
            await client.send_syn_stream(100, {"a": "b"})
            while len(client.resets) < 2:
                await client.window_changed_wait()
            assert client.resets == [(99, spdy.RstStatus.INVALID_STREAM),
                                     (100, spdy.RstStatus.PROTOCOL_ERROR)]
            client.next_id = 101
            stream = await client.open_stream({"a": "b"})
            await stream.write(b"still works")
            await stream.close()
            assert await stream.read_all() == b"11"
            assert not session.is_closed
    run(main())


def test_close_resets_open_streams_and_sends_goaway() -> None:
    async def main() -> None:
        async def idle(stream: SpdyStream) -> None:
            await asyncio.Event().wait()

        async with connected(idle) as (session, client, _server):
            stream = await client.open_stream({})
            await session.close()
            assert client.goaway == (stream.id, spdy.GoAwayStatus.OK)
            assert (stream.id, spdy.RstStatus.CANCEL) in client.resets
    run(main())
