"""Non-blocking reads and writes on a raw file descriptor, from the event loop.

Interactive exec hands the OCI runtime plain pipes and the slave side of a
pseudo-terminal; our ends (pipe ends, the pty master) are driven here with
`loop.add_reader` / `loop.add_writer`. We own these descriptors outright and
close them at a point we choose, which is what makes "no descriptor leaked
after the client vanished" easy to guarantee (asyncio's subprocess pipes
close only when the transport decides to).

A pty master reports EIO once every holder of the slave side has closed it
and the buffered output has been read: that is end of file here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os


class AsyncFd:
    """One end of a pipe or a pty master, owned (closed) by this object."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = asyncio.get_running_loop()

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("file descriptor is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    async def read(self, n: int = 65536) -> bytes:
        """Up to n bytes; b"" at end of file (EIO from a pty master included)."""
        while True:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                await self._ready(write=False)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        """All of data; BrokenPipeError when the other side is closed."""
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:
                await self._ready(write=True)

    async def _ready(self, write: bool) -> None:
        fd = self.fd
        future: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        if write:
            self._loop.add_writer(fd, wake)
        else:
            self._loop.add_reader(fd, wake)
        try:
            await future
        finally:
            if write:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    def close(self) -> None:
        """Close the descriptor (idempotent). No read or write may be pending."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
