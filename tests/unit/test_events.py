"""The container event bus: order, fan-out, slow subscribers dropped, never blocking."""

from __future__ import annotations

import asyncio
import time

import pytest

from api import api_pb2
from cri.errors import InvalidArgument, ResourceExhausted, Unavailable
from runtimeservice.events import EventBus, Subscription


def event(i: int, kind: int = api_pb2.CONTAINER_CREATED_EVENT) -> api_pb2.ContainerEventResponse:
    return api_pb2.ContainerEventResponse(container_id=f"c{i}", container_event_type=kind,
                                          created_at=i)


async def take(sub: Subscription, n: int) -> list[str]:
    out = []
    async for ev in sub:
        out.append(ev.container_id)
        if len(out) == n:
            break
    return out


def test_events_arrive_in_publish_order() -> None:
    async def main() -> None:
        bus = EventBus()
        sub = bus.subscribe()
        kinds = [api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT,
                 api_pb2.CONTAINER_STOPPED_EVENT, api_pb2.CONTAINER_DELETED_EVENT]
        for i, kind in enumerate(kinds):
            bus.publish(event(i, kind))
        got = [await anext(sub) for _ in kinds]
        assert [e.container_event_type for e in got] == kinds
        assert [e.created_at for e in got] == [0, 1, 2, 3]
        sub.close()
        assert bus.subscribers == 0

    asyncio.run(main())


def test_a_subscriber_only_sees_events_published_after_it_subscribed() -> None:
    async def main() -> None:
        bus = EventBus()
        bus.publish(event(0))
        sub = bus.subscribe()
        bus.publish(event(1))
        assert (await anext(sub)).container_id == "c1"
        assert sub.pending == 0

    asyncio.run(main())


def test_many_concurrent_subscribers_all_see_everything() -> None:
    async def main() -> None:
        bus = EventBus()
        subs = [bus.subscribe() for _ in range(50)]
        readers = [asyncio.create_task(take(s, 200)) for s in subs]

        async def publisher() -> None:
            for i in range(200):
                bus.publish(event(i))
                if i % 7 == 0:
                    await asyncio.sleep(0)  # let readers interleave with publishing

        await publisher()
        results = await asyncio.gather(*readers)
        expected = [f"c{i}" for i in range(200)]
        assert all(r == expected for r in results)

    asyncio.run(main())


def test_a_subscriber_that_never_reads_is_dropped_with_a_clear_error() -> None:
    async def main() -> None:
        bus = EventBus()
        stuck = bus.subscribe(max_buffer=10)
        healthy = bus.subscribe(max_buffer=100)
        for i in range(11):
            bus.publish(event(i))
        assert not stuck.active and healthy.active
        assert bus.subscribers == 1
        with pytest.raises(ResourceExhausted,
                           match="event subscriber too slow: dropped after 10 buffered events"):
            await anext(stuck)
        # The error is sticky: the dropped stream does not resume.
        bus.publish(event(11))
        with pytest.raises(ResourceExhausted):
            await anext(stuck)
        assert await take(healthy, 12) == [f"c{i}" for i in range(12)]

    asyncio.run(main())


def test_a_stuck_subscriber_does_not_slow_publish() -> None:
    n = 10_000

    def publish_time(with_stuck: bool) -> float:
        bus = EventBus()
        healthy = bus.subscribe(max_buffer=n)
        stuck = bus.subscribe(max_buffer=100) if with_stuck else None
        events = [event(i) for i in range(n)]
        start = time.perf_counter()
        for ev in events:
            bus.publish(ev)
        elapsed = time.perf_counter() - start
        assert healthy.pending == n
        if stuck is not None:
            assert not stuck.active
        return elapsed

    async def main() -> tuple[float, float]:
        # Best of several rounds: the ratio, not an absolute time, is the assertion.
        base = min(publish_time(False) for _ in range(5))
        slow = min(publish_time(True) for _ in range(5))
        return base, slow

    base, slow = asyncio.run(main())
    assert slow / base < 5, f"publish took {slow / base:.1f}x longer with a stuck subscriber"


def test_cancelling_a_reader_unsubscribes_it() -> None:
    async def main() -> None:
        bus = EventBus()
        sub = bus.subscribe()
        reader = asyncio.create_task(take(sub, 5))
        bus.publish(event(0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert bus.subscribers == 1
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert bus.subscribers == 0 and not sub.active
        bus.publish(event(1))  # nobody left to receive it: no error, no buffering
        assert sub.pending == 0

    asyncio.run(main())


def test_context_manager_unsubscribes() -> None:
    async def main() -> None:
        bus = EventBus()
        async with bus.subscribe() as sub:
            bus.publish(event(0))
            assert (await anext(sub)).container_id == "c0"
            assert bus.subscribers == 1
        assert bus.subscribers == 0

    asyncio.run(main())


def test_close_ends_every_subscription_after_buffered_events() -> None:
    async def main() -> None:
        bus = EventBus()
        waiting = bus.subscribe()
        reader = asyncio.create_task(take(waiting, 100))
        buffered = bus.subscribe()
        bus.publish(event(0))
        bus.publish(event(1))
        await asyncio.sleep(0)
        bus.close()
        assert await reader == ["c0", "c1"]
        assert [e.container_id async for e in buffered] == ["c0", "c1"]
        assert bus.subscribers == 0
        with pytest.raises(Unavailable, match="shutting down"):
            bus.subscribe()
        bus.publish(event(2))  # publishing after close is harmless

    asyncio.run(main())


def test_buffer_size_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="got 0"):
        EventBus().subscribe(max_buffer=0)
