"""An inbound byte buffer: what a connection's reader loop has received for one
stream or channel, waiting for that stream's consumer.

The reader loop `feed`s bytes and then awaits `wait_below_high_water`, so a
consumer that falls behind slows the whole connection down (TCP backpressure)
instead of letting memory grow. `on_consumed` reports every byte handed to the
consumer (or dropped by `discard`), which is what SPDY flow control needs to
send WINDOW_UPDATE frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def shutting_down() -> bool:
    """True in a task being cancelled: closing handshakes should not linger."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class StreamResetError(ConnectionError):
    """The stream or channel was reset (by the peer or because its connection died)."""


class InboundBuffer:
    def __init__(self, high_water: int = 256 * 1024,
                 on_consumed: Callable[[int], None] | None = None) -> None:
        self._buf = bytearray()
        self._eof = False
        self._exc: BaseException | None = None
        self._discard = False
        self._high_water = high_water
        self._on_consumed = on_consumed
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    # ---- producer side (the connection's reader loop)

    def feed(self, data: bytes) -> None:
        if not data or self._eof or self._exc is not None:
            return
        if self._discard:
            self._consumed(len(data))
            return
        self._buf += data
        self._readable.set()
        if len(self._buf) >= self._high_water:
            self._drained.clear()

    def feed_eof(self) -> None:
        self._eof = True
        self._readable.set()
        self._drained.set()

    def set_exception(self, exc: BaseException) -> None:
        """Fail reads once the buffered bytes are consumed; a stream whose end
        already arrived is left alone."""
        if self._eof or self._exc is not None:
            return
        self._exc = exc
        self._readable.set()
        self._drained.set()

    async def wait_below_high_water(self) -> None:
        await self._drained.wait()

    # ---- consumer side

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buf

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def discard(self) -> None:
        """Nobody will read: drop what is buffered and everything that comes."""
        self._discard = True
        dropped = len(self._buf)
        self._buf.clear()
        self._drained.set()
        if dropped:
            self._consumed(dropped)

    async def read(self, n: int = 65536) -> bytes:
        """Up to `n` bytes; b"" at end of stream; StreamResetError after a reset."""
        while not self._buf:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        if len(self._buf) < self._high_water:
            self._drained.set()
        self._consumed(len(chunk))
        return chunk

    def _consumed(self, n: int) -> None:
        if self._on_consumed is not None and n:
            self._on_consumed(n)
