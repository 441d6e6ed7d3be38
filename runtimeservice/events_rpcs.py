"""GetContainerEvents: the event stream the kubelet's evented PLEG subscribes to.

Events. The container layer publishes one `ContainerEventResponse` per
lifecycle change — CREATED, STARTED, STOPPED (an exit, however it was
learned), DELETED — carrying, as the kubelet expects, the pod sandbox's status
(`pod_sandbox_status`, with its metadata: the kubelet drops an event without
it) and the statuses of every container of that pod (`containers_statuses`;
the kubelet replaces its cached pod status with them, and matches the
STOPPED container's own status by id to spot a crash). A DELETED event lists
the pod's remaining containers.

Subscribers. The stream's response headers are sent as soon as it is
subscribed, so a client that waits for them (`initial_metadata()`) knows it
misses nothing published afterwards. Each stream has its own bounded buffer on the `EventBus`;
publishing never blocks nor awaits. A subscriber that stops reading fills its
buffer (once gRPC's flow-control window is full, the stream's writes stall)
and is dropped: the runtime keeps going at full speed, and the stream ends
with RESOURCE_EXHAUSTED after delivering what it had buffered — the kubelet
then relists and subscribes again. The buffer size is `runtime.event_buffer`
(default `DEFAULT_BUFFER`).

Exits found at start. Exits that happened while the daemon was down are
recorded during start-up recovery, before the daemon accepts any call, so no
stream is open to receive them. The hub keeps the events recovery publishes
(at most `REPLAY_LIMIT`, oldest dropped first) and, for `REPLAY_WINDOW`
seconds (`runtime.event_replay_window`) after recovery finished, hands them
first to every new subscriber, then the live events. Every subscriber in the
window gets them — a kubelet reconnecting after the restart, a second
client — so a client that reconnects twice may see them twice; the kubelet
tolerates repeats (statuses are idempotent, events carry `created_at`).
After the window the replay is forgotten.

Shutdown. The streams never end on their own; `EventHub.close()` ends them
(what is buffered is delivered, then UNAVAILABLE) so that they do not hold
the gRPC server's shutdown grace period.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from api import api_pb2
from cri.errors import Unavailable
from runtimeservice.events import DEFAULT_BUFFER, EventBus, Subscription

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

REPLAY_LIMIT = 1000  # events kept from start-up recovery
REPLAY_WINDOW = 60.0  # s after recovery during which new subscribers get them


class EventHub:
    """The bus plus the events of start-up recovery, replayed to early subscribers."""

    def __init__(self, buffer: int = DEFAULT_BUFFER, replay_window: float = REPLAY_WINDOW,
                 replay_limit: int = REPLAY_LIMIT) -> None:
        self.bus = EventBus()
        self.buffer = buffer
        self.replay_window = replay_window
        self._replay: collections.deque[api_pb2.ContainerEventResponse] = \
            collections.deque(maxlen=replay_limit)
        self._recovering = True
        self._replay_until = 0.0
        self._overflowed = False
        self.closed = False

    @property
    def wanted(self) -> bool:
        """Would a published event reach anyone? (Lets publishers skip building it.)"""
        return self._recovering or self.bus.subscribers > 0

    def publish(self, event: api_pb2.ContainerEventResponse) -> None:
        """Hand `event` to every subscriber (never blocks); kept for replay while recovering."""
        if self._recovering:
            if len(self._replay) == self._replay.maxlen and not self._overflowed:
                self._overflowed = True
                log.warning("more than %d container events during start-up recovery: the "
                            "oldest will not be replayed", self._replay.maxlen)
            self._replay.append(event)
        self.bus.publish(event)

    def recovered(self) -> None:
        """Start-up recovery is over: replay its events to subscribers for a while."""
        if not self._recovering:
            return
        self._recovering = False
        self._replay_until = asyncio.get_running_loop().time() + self.replay_window
        if self._replay:
            log.info("%d container event(s) from start-up recovery will be replayed to "
                     "subscribers for %.0fs", len(self._replay), self.replay_window)

    def subscribe(self) -> tuple[list[api_pb2.ContainerEventResponse], Subscription]:
        """A new subscription, and the recovery events to deliver before its own."""
        sub = self.bus.subscribe(self.buffer)
        replay: list[api_pb2.ContainerEventResponse] = []
        if self._replay and not self._recovering:
            if asyncio.get_running_loop().time() < self._replay_until:
                replay = list(self._replay)
            else:
                self._replay.clear()
        return replay, sub

    def close(self) -> None:
        """End every stream (each delivers what it has buffered, then UNAVAILABLE); new
        ones are refused. The daemon calls this first when it shuts down: the streams
        never end by themselves and would hold the gRPC server's shutdown grace."""
        self.closed = True
        self.bus.close()


class EventHandlers:
    """The GetContainerEvents RPC; RuntimeService sets `self.event_hub`."""

    event_hub: EventHub

    async def GetContainerEvents(self, request: api_pb2.GetEventsRequest, context: Ctx
                                 ) -> AsyncIterator[api_pb2.ContainerEventResponse]:
        replay, sub = self.event_hub.subscribe()
        # The headers go out once the subscription is in place: a client that waits
        # for them knows it will see every event published from then on.
        await context.send_initial_metadata(())
        log.debug("event subscriber attached (%d subscriber(s), %d replayed event(s))",
                  self.event_hub.bus.subscribers, len(replay))
        try:
            for event in replay:
                yield event
            async for event in sub:
                yield event
        finally:
            sub.close()
        if self.event_hub.closed:
            raise Unavailable("crib is shutting down: the container event stream ends")
