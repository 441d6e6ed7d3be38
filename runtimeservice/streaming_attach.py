"""Attach: a streaming client joined to a container's main process through conmon.

conmon listens on a SOCK_SEQPACKET unix socket (`Monitor.attach_socket_path`).
Every message it sends starts with one byte naming the pipe the bytes came
from (`ATTACH_PIPE_STDOUT`, `ATTACH_PIPE_STDERR`); a container with a
terminal has one output, sent as stdout. What a client sends is written to
the container's stdin — conmon reads at most 32 KiB - 1 per message, so input
goes in smaller messages. Shutting down our sending side tells conmon the
input ended: it then closes the container's stdin if the container was
created with `stdin_once`, and keeps it open otherwise.

The socket path can exceed the 108-byte limit of a unix socket address (it
lives under the daemon's runroot), so we connect through
`/proc/self/fd/<directory fd>/attach`, as conmon does when it binds it.

The attach ends when conmon closes the connection (the container exited and
its output was delivered). A cancellation (the client went away) just closes
our connection: the container is not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

from cri.errors import CribError, FailedPrecondition
from cri.streaming.backend import InputStream, OutputStream, StreamIO, TerminalSize
from runtimeservice.monitor import ATTACH_PIPE_STDERR, ATTACH_PIPE_STDOUT
from runtimeservice.settle import settle

log = logging.getLogger(__name__)

# conmon's receive buffer is 32 KiB and it reads one message at most 32 KiB - 1 long.
STDIN_MESSAGE = 16 * 1024
RECV_SIZE = 64 * 1024

Resize = Callable[[TerminalSize], Awaitable[None]]


async def connect_attach_socket(path: str, container_id: str) -> socket.socket:
    """A connected, non-blocking SOCK_SEQPACKET socket to conmon's attach socket."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    try:
        dir_fd = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(
            f"cannot attach to container {container_id}: its monitor's socket directory "
            f"{os.path.dirname(path)} is not there ({exc.strerror}); is it running?") from None
    try:
        await loop.sock_connect(sock, f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}")
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(
            f"cannot attach to container {container_id}: connecting to its monitor at {path} "
            f"failed ({exc.strerror or exc}); is it running?") from None
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


async def attach_stream(path: str, container_id: str, io: StreamIO, *, stdin: bool,
                        tty: bool, resize: Resize) -> None:
    """Copy between the client and conmon's attach socket until the container's
    output ends. `stdin`: the container was created with stdin (else client
    input is read and dropped); `tty`: it has a terminal (resizes are applied
    with `resize`, else ignored)."""
    sock = await connect_attach_socket(path, container_id)
    tasks: list[asyncio.Task[None]] = []
    try:
        if io.stdin is not None:
            tasks.append(asyncio.ensure_future(
                _copy_in(sock, io.stdin) if stdin else _drop(io.stdin)))
        if tty and io.resize is not None:
            tasks.append(asyncio.ensure_future(_resizes(io.resize, resize, container_id)))
        await _copy_out(sock, io.stdout, io.stderr, tty)
    finally:
        try:
            for exc in await settle(tasks):
                if not isinstance(exc, ConnectionError | OSError):
                    log.error("attach copy failed", exc_info=exc)
        finally:
            sock.close()


async def _copy_out(sock: socket.socket, stdout: OutputStream | None,
                    stderr: OutputStream | None, tty: bool) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            message = await loop.sock_recv(sock, RECV_SIZE)
        except ConnectionResetError:
            return
        if not message:
            return
        pipe, data = message[0], message[1:]
        if not data:
            continue
        if pipe == ATTACH_PIPE_STDERR and not tty:
            target = stderr
        elif pipe in (ATTACH_PIPE_STDOUT, ATTACH_PIPE_STDERR):
            target = stdout
        else:
            log.debug("attach: message for unknown pipe %d dropped", pipe)
            continue
        if target is not None:
            await target.write(data)


async def _copy_in(sock: socket.socket, src: InputStream) -> None:
    loop = asyncio.get_running_loop()
    try:
        while chunk := await src.read(STDIN_MESSAGE):
            for i in range(0, len(chunk), STDIN_MESSAGE):
                await loop.sock_sendall(sock, chunk[i:i + STDIN_MESSAGE])
    except (ConnectionError, OSError) as exc:
        log.debug("attach stdin copy ended: %s", exc)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def _drop(src: InputStream) -> None:
    """Input for a container without stdin: read so the client is never blocked."""
    with contextlib.suppress(ConnectionError):
        while await src.read(RECV_SIZE):
            pass


async def _resizes(sizes: AsyncIterator[TerminalSize], resize: Resize,
                   container_id: str) -> None:
    async for size in sizes:
        try:
            await resize(size)
        except CribError as exc:  # the container is going away
            log.debug("resizing the terminal of container %s failed: %s", container_id, exc)
