"""The plumbing under interactive exec and attach, without containers: async
reads/writes on pipes and a pty, window sizes, clean-up that survives a second
cancellation, and the attach protocol against a stand-in for conmon's
SOCK_SEQPACKET socket (prefix byte per message, input in small messages,
end of input as a shutdown)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cri.errors import FailedPrecondition
from cri.streaming.backend import StreamIO, TerminalSize
from runtimeservice.asyncfd import AsyncFd
from runtimeservice.monitor import ATTACH_PIPE_STDERR, ATTACH_PIPE_STDOUT
from runtimeservice.settle import complete, settle
from runtimeservice.streaming_attach import STDIN_MESSAGE, attach_stream
from runtimeservice.streaming_exec import copy_in, copy_out, set_window_size, window_size


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: bytes) -> None:
        self.data += data


class Source:
    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int = 65536) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_pipe_copies_and_eof() -> None:
    async def main() -> None:
        r, w = os.pipe()
        reader, writer = AsyncFd(r), AsyncFd(w)
        data = os.urandom(1024 * 1024)  # more than a pipe buffer: writes must wait
        sink = Sink()
        await asyncio.gather(copy_in(Source(data[:300000], data[300000:]), writer,
                                     close_at_eof=True),
                             copy_out(reader, sink))
        assert bytes(sink.data) == data and writer.closed
        reader.close()
        reader.close()  # idempotent

    asyncio.run(main())


def test_a_pty_master_reads_eof_once_the_slave_is_closed() -> None:
    async def main() -> None:
        master, slave = os.openpty()
        m = AsyncFd(master)
        set_window_size(master, TerminalSize(width=120, height=33))
        assert window_size(slave) == TerminalSize(width=120, height=33)
        os.write(slave, b"left in the buffer")
        os.close(slave)
        got = b""
        while chunk := await m.read():
            got += chunk
        assert got.replace(b"\r", b"") == b"left in the buffer"
        m.close()

    asyncio.run(main())


def test_writing_to_a_closed_pipe_is_a_broken_pipe_and_copy_in_stops() -> None:
    async def main() -> None:
        r, w = os.pipe()
        os.close(r)
        writer = AsyncFd(w)
        with pytest.raises(BrokenPipeError):
            await writer.write(b"x")
        await copy_in(Source(b"y", b"z"), writer, close_at_eof=False)  # no exception
        assert not writer.closed
        writer.close()

    asyncio.run(main())


def test_complete_finishes_clean_up_under_repeated_cancellation() -> None:
    async def main() -> None:
        steps: list[str] = []
        release = asyncio.Event()

        async def cleanup() -> str:
            steps.append("start")
            await release.wait()
            steps.append("end")
            return "done"

        async def session() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await complete(cleanup())

        task = asyncio.ensure_future(session())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # a second cancellation, while cleaning up
        await asyncio.sleep(0)
        assert steps == ["start"] and not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["start", "end"]
        assert await complete(asyncio.sleep(0, "value")) == "value"

    asyncio.run(main())


def test_settle_cancels_and_reports_real_failures() -> None:
    async def main() -> None:
        async def fails() -> None:
            raise ValueError("boom")

        tasks = [asyncio.ensure_future(asyncio.Event().wait()), asyncio.ensure_future(fails())]
        await asyncio.sleep(0)
        errors = await settle(tasks)
        assert [type(e) for e in errors] == [ValueError] and all(t.done() for t in tasks)

    asyncio.run(main())


# ---------------------------------------------------------------- attach


class FakeConmon:
    """A listening SOCK_SEQPACKET socket where conmon's attach socket would be."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "attach")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.setblocking(False)

    async def accept(self) -> socket.socket:
        conn, _ = await asyncio.get_running_loop().sock_accept(self.listener)
        return conn

    def close(self) -> None:
        self.listener.close()


async def _sizes(*sizes: TerminalSize) -> AsyncIterator[TerminalSize]:
    for size in sizes:
        yield size


def test_attach_demultiplexes_output_and_sends_input_in_messages(tmp_path: Path) -> None:
    async def main() -> None:
        conmon = FakeConmon(tmp_path)
        loop = asyncio.get_running_loop()
        stdout, stderr = Sink(), Sink()
        big = os.urandom(3 * STDIN_MESSAGE + 5)
        io = StreamIO(Source(b"hello\n", big), stdout, stderr, False, None)

        async def conmon_side() -> list[bytes]:
            conn = await conmon.accept()
            messages = []
            while msg := await loop.sock_recv(conn, 65536):
                messages.append(msg)   # until our side shut down its input
            for pipe, text in ((ATTACH_PIPE_STDOUT, b"out"), (ATTACH_PIPE_STDERR, b"err"),
                               (ATTACH_PIPE_STDOUT, b""), (9, b"unknown pipe")):
                await loop.sock_sendall(conn, bytes([pipe]) + text)
            conn.close()
            return messages

        server = asyncio.ensure_future(conmon_side())

        async def no_resize(size: TerminalSize) -> None:
            raise AssertionError("no terminal: no resize")

        await attach_stream(conmon.path, "c1", io, stdin=True, tty=False, resize=no_resize)
        messages = await server
        assert b"".join(messages) == b"hello\n" + big
        assert max(len(m) for m in messages) <= STDIN_MESSAGE
        assert (bytes(stdout.data), bytes(stderr.data)) == (b"out", b"err")
        conmon.close()

    asyncio.run(main())


def test_attach_with_a_tty_without_stdin(tmp_path: Path) -> None:
    async def main() -> None:
        conmon = FakeConmon(tmp_path)
        loop = asyncio.get_running_loop()
        stdout = Sink()
        resized: list[TerminalSize] = []
        done = asyncio.Event()

        async def resize(size: TerminalSize) -> None:
            resized.append(size)
            if len(resized) == 2:
                done.set()
            if size.width == 0:
                raise FailedPrecondition("gone")  # logged and ignored

        sizes = _sizes(TerminalSize(80, 24), TerminalSize(0, 0))
        io = StreamIO(Source(b"typed but dropped"), stdout, None, True, sizes)

        async def conmon_side() -> None:
            conn = await conmon.accept()
            await done.wait()
            await loop.sock_sendall(conn, bytes([ATTACH_PIPE_STDERR]) + b"all is stdout")
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(100)  # the client's input never reached us
            conn.close()

        server = asyncio.ensure_future(conmon_side())
        await attach_stream(conmon.path, "c1", io, stdin=False, tty=True, resize=resize)
        await server
        assert bytes(stdout.data) == b"all is stdout"
        assert resized == [TerminalSize(80, 24), TerminalSize(0, 0)]
        conmon.close()

    asyncio.run(main())


def test_attach_to_a_missing_socket_is_a_failed_precondition(tmp_path: Path) -> None:
    async def main() -> None:
        io = StreamIO(None, Sink(), None, False, None)

        async def resize(size: TerminalSize) -> None:
            return None

        for path in (tmp_path / "attach", tmp_path / "no-dir" / "attach"):
            with pytest.raises(FailedPrecondition, match="cannot attach to container c1"):
                await attach_stream(str(path), "c1", io, stdin=False, tty=False,
                                    resize=resize)
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(FailedPrecondition):
            await attach_stream(str(tmp_path / "attach"), "c1", io, stdin=False, tty=False,
                                resize=resize)
        assert len(os.listdir("/proc/self/fd")) == fds

    asyncio.run(main())
