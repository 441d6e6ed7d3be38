"""The container event bus behind GetContainerEvents.

The runtime publishes one `ContainerEventResponse` per lifecycle change
(CREATED, STARTED, STOPPED, DELETED); every GetContainerEvents stream holds a
`Subscription` and relays what it receives.

`publish()` never blocks and never awaits: it appends the event to each
subscriber's bounded buffer and wakes it. A subscriber whose buffer is full is
too slow to keep up; rather than block the runtime or grow without bound, the
bus drops it, and its next read raises RESOURCE_EXHAUSTED (the kubelet then
falls back to relisting and subscribes again).

Everything runs on the event loop thread: publish from a coroutine or a
callback on the loop (from another thread use ``loop.call_soon_threadsafe``).
Events are shared between subscribers and must not be modified once published.

Typical stream handler::

    async with bus.subscribe() as sub:
        async for event in sub:
            yield event
"""

from __future__ import annotations

import asyncio
import collections
import logging
from types import TracebackType

from api import api_pb2
from cri.errors import CribError, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DEFAULT_BUFFER = 1000


class Subscription:
    """One subscriber's view of the bus: an async iterator of events, in publish order."""

    def __init__(self, bus: EventBus, max_buffer: int) -> None:
        self._bus: EventBus | None = bus
        self.max_buffer = max_buffer
        self._items: collections.deque[api_pb2.ContainerEventResponse] = collections.deque()
        self._wake = asyncio.Event()
        self._ended = False  # no more events will arrive: deliver what is buffered, then stop
        self._error: CribError | None = None

    @property
    def active(self) -> bool:
        """Still attached to the bus (not closed, dropped or ended)."""
        return self._bus is not None

    @property
    def pending(self) -> int:
        return len(self._items)

    # -- called by the bus (synchronously, on the loop)

    def _offer(self, event: api_pb2.ContainerEventResponse) -> bool:
        """Buffer `event`; False when the buffer is full and the subscriber must be dropped."""
        if len(self._items) >= self.max_buffer:
            return False
        self._items.append(event)
        self._wake.set()
        return True

    def _drop(self) -> None:
        self._bus = None
        self._items.clear()
        self._error = ResourceExhausted(
            f"event subscriber too slow: dropped after {self.max_buffer} buffered events")
        self._wake.set()

    def _end(self) -> None:
        self._bus = None
        self._ended = True
        self._wake.set()

    # -- the subscriber's side

    def close(self) -> None:
        """Unsubscribe; the iterator stops at once (buffered events are discarded)."""
        bus, self._bus = self._bus, None
        if bus is not None:
            bus._remove(self)
        self._items.clear()
        self._ended = True
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> api_pb2.ContainerEventResponse:
        while True:
            if self._error is not None:
                raise self._error
            if self._items:
                return self._items.popleft()
            if self._ended:
                raise StopAsyncIteration
            self._wake.clear()
            try:
                await self._wake.wait()
            except asyncio.CancelledError:
                # The stream's client went away: stop buffering for it.
                self.close()
                raise

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class EventBus:
    """Fans container events out to any number of subscribers without ever blocking."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, max_buffer: int = DEFAULT_BUFFER) -> Subscription:
        """A new subscription that sees every event published from now on."""
        if max_buffer < 1:
            raise InvalidArgument(f"event buffer size must be at least 1, got {max_buffer}")
        if self._closed:
            raise Unavailable("the container event bus is closed: crib is shutting down")
        sub = Subscription(self, max_buffer)
        self._subs.add(sub)
        return sub

    def publish(self, event: api_pb2.ContainerEventResponse) -> None:
        """Hand `event` to every subscriber; drops those whose buffer is full. Never blocks."""
        dropped = [sub for sub in self._subs if not sub._offer(event)]
        for sub in dropped:
            self._subs.discard(sub)
            sub._drop()
            log.warning("dropped a container event subscriber: %d events buffered and unread",
                        sub.max_buffer)

    def close(self) -> None:
        """End every subscription (each delivers what it has buffered, then stops)."""
        self._closed = True
        subs, self._subs = self._subs, set()
        for sub in subs:
            sub._end()

    def _remove(self, sub: Subscription) -> None:
        self._subs.discard(sub)
