"""Interactive exec: a command in a running container, wired to a streaming client.

The command runs as `<runtime> exec --process <spec> --pid-file <file>` in the
foreground, so the runtime's own exit status is the command's (runc returns
the process's status, 128+N for a signal) and nothing else has to reap it.

Without a TTY the runtime gets three pipes; it copies them to and from the
process and exits only when the process has exited and its output has been
copied, so our ends reach EOF right after. Closing our end of the stdin pipe
(the client closed its input) closes the process's stdin.

With a TTY the runtime's stdin/stdout/stderr are the slave side of a
pseudo-terminal we open (in raw mode, so our side adds no echo or line
editing). The runtime allocates the container's own terminal, proxies it to
ours and, on start and on every SIGWINCH, copies our window size to it: a
resize from the client is TIOCSWINSZ on our master followed by SIGWINCH to
the runtime. (`--console-socket`, which would hand us the container's
terminal directly, is refused by runc unless it detaches, and a detached
runtime leaves the exit status to whoever reaps the process.)

When the client goes away the call is cancelled: every process in the exec'd
process's session (the runtime makes it a session leader; the pid file names
it) and the runtime are killed, and every descriptor we opened is closed
before the cancellation goes on. The runtime process sits in a session of its
own, as in ExecSync.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import struct
import tempfile
import termios
import tty
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

from cri.errors import FailedPrecondition
from cri.streaming.backend import InputStream, OutputStream, StreamIO, TerminalSize
from runtimeservice.asyncfd import AsyncFd
from runtimeservice.exec import kill_exec, write_process_file
from runtimeservice.oci import OciRuntime, read_text
from runtimeservice.ocierrors import runtime_error_message
from runtimeservice.settle import complete, settle

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024


async def exec_stream(runtime: OciRuntime, container_id: str, process: Mapping[str, Any],
                      io: StreamIO, *, work_dir: str | None = None) -> int:
    """Run `process` (an OCI process spec; `terminal` must match `io.tty`) in
    the container with the client's streams; its exit code."""
    if bool(process.get("terminal")) != io.tty:
        raise ValueError("process.terminal must match io.tty")
    work = await asyncio.to_thread(tempfile.mkdtemp, prefix="exec-", dir=work_dir)
    try:
        process_file = await asyncio.to_thread(write_process_file, process, work)
        pid_file = os.path.join(work, "pid")
        log_file = os.path.join(work, "runtime.log")
        argv = [runtime.path, "--log", log_file, *runtime.global_args(),
                *runtime.exec_args(container_id, process_file, pid_file=pid_file)]
        session = _Session(runtime, argv, pid_file, io)
        try:
            code = await session.run()
        finally:
            await complete(session.cleanup())
        if code != 0:
            text = await asyncio.to_thread(read_text, log_file)
            if runtime_error_message(text):
                # The runtime itself failed: the command never ran.
                raise runtime.error(f"exec in container {container_id}", text)
        return code
    finally:
        await complete(asyncio.to_thread(shutil.rmtree, work, True))


class _Session:
    """One exec: the runtime process, our descriptors and the copying tasks."""

    def __init__(self, runtime: OciRuntime, argv: list[str], pid_file: str,
                 io: StreamIO) -> None:
        self.runtime = runtime
        self.argv = argv
        self.pid_file = pid_file
        self.io = io
        self.proc: asyncio.subprocess.Process | None = None
        self.fds: list[AsyncFd] = []  # our ends
        self.child_fds: list[int] = []  # the runtime's ends, closed once it has them
        self.tasks: list[asyncio.Task[None]] = []

    def _task(self, aw: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(aw)
        self.tasks.append(task)
        return task

    def _own(self, fd: int) -> AsyncFd:
        afd = AsyncFd(fd)
        self.fds.append(afd)
        return afd

    async def _spawn(self, stdin: int, stdout: int, stderr: int) -> asyncio.subprocess.Process:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=stdin, stdout=stdout, stderr=stderr,
                start_new_session=True)
        except OSError as exc:
            raise FailedPrecondition(
                f"runtime handler {self.runtime.handler!r}: cannot run {self.runtime.path}: "
                f"{exc.strerror}") from exc
        finally:
            self._close_child_fds()
        return self.proc

    def _close_child_fds(self) -> None:
        while self.child_fds:
            os.close(self.child_fds.pop())

    async def run(self) -> int:
        proc = await (self._run_tty() if self.io.tty else self._run_pipes())
        code = proc.returncode
        assert code is not None
        return code if code >= 0 else 128 - code  # the runtime itself was killed

    async def _run_pipes(self) -> asyncio.subprocess.Process:
        io = self.io

        def pipe(wanted: bool, child_reads: bool) -> tuple[AsyncFd | None, int]:
            if not wanted:
                return None, asyncio.subprocess.DEVNULL
            r, w = os.pipe()
            ours, theirs = (w, r) if child_reads else (r, w)
            self.child_fds.append(theirs)
            return self._own(ours), theirs

        stdin, child_in = pipe(io.stdin is not None, True)
        stdout, child_out = pipe(io.stdout is not None, False)
        stderr, child_err = pipe(io.stderr is not None, False)
        proc = await self._spawn(child_in, child_out, child_err)
        outputs = [self._task(copy_out(src, dst))
                   for src, dst in ((stdout, io.stdout), (stderr, io.stderr)) if src]
        if stdin is not None and io.stdin is not None:
            self._task(copy_in(io.stdin, stdin, close_at_eof=True))
        await asyncio.gather(proc.wait(), *outputs)
        return proc

    async def _run_tty(self) -> asyncio.subprocess.Process:
        io = self.io
        master_fd, slave_fd = os.openpty()
        self.child_fds.append(slave_fd)
        master = self._own(master_fd)
        tty.setraw(slave_fd)
        resizing = None
        if io.resize is not None:
            resizing = self._task(self._resize(io.resize, master))
            await asyncio.sleep(0)  # a size the client sent at once is applied before start
        proc = await self._spawn(slave_fd, slave_fd, slave_fd)
        output = self._task(copy_out(master, io.stdout))
        if io.stdin is not None:
            self._task(copy_in(io.stdin, master, close_at_eof=False))
        await asyncio.gather(proc.wait(), output)
        if resizing is not None:
            resizing.cancel()
        return proc

    async def _resize(self, sizes: AsyncIterator[TerminalSize], master: AsyncFd) -> None:
        async for size in sizes:
            if master.closed:
                return
            set_window_size(master.fd, size)
            proc = self.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGWINCH)

    async def cleanup(self) -> None:
        """Stop copying, kill what still runs, close our descriptors."""
        for exc in await settle(self.tasks):
            if not isinstance(exc, ConnectionError | OSError):
                log.error("exec stream copy failed", exc_info=exc)
        if self.proc is not None and self.proc.returncode is None:
            await kill_exec(self.proc, self.pid_file)
        self._close_child_fds()
        for fd in self.fds:
            fd.close()


async def copy_out(src: AsyncFd, dst: OutputStream | None) -> None:
    """Process output to the client until EOF (dropped when nobody asked for it)."""
    while chunk := await src.read(READ_CHUNK):
        if dst is not None:
            await dst.write(chunk)


async def copy_in(src: InputStream, dst: AsyncFd, *, close_at_eof: bool) -> None:
    """Client input to the process. At the client's end of input a pipe is
    closed (the process sees EOF); a terminal is left as it is."""
    try:
        while chunk := await src.read(READ_CHUNK):
            await dst.write(chunk)
    except (ConnectionError, OSError) as exc:  # client or process went away
        log.debug("exec stdin copy ended: %s", exc)
    if close_at_eof:
        dst.close()


def set_window_size(fd: int, size: TerminalSize) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.height, size.width, 0, 0))


def window_size(fd: int) -> TerminalSize:
    rows, cols, _, _ = struct.unpack(
        "HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return TerminalSize(width=cols, height=rows)
