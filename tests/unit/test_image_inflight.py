"""imageservice.inflight.Shared: one task per key, joined, and stopped when nobody waits."""

from __future__ import annotations

import asyncio

import pytest

from imageservice.inflight import Shared


def test_concurrent_callers_share_one_task() -> None:
    async def main() -> None:
        shared: Shared[str, int] = Shared("job")
        starts = 0
        gate = asyncio.Event()

        async def work() -> int:
            nonlocal starts
            starts += 1
            await gate.wait()
            return 42

        waiters = [asyncio.ensure_future(shared.run("k", work)) for _ in range(10)]
        await asyncio.sleep(0)
        assert shared.running("k")
        gate.set()
        assert await asyncio.gather(*waiters) == [42] * 10
        assert starts == 1
        assert not shared.running("k")
        assert await shared.run("k", work) == 42  # done tasks are not reused
        assert starts == 2

    asyncio.run(main())


def test_failure_reaches_every_waiter() -> None:
    async def main() -> None:
        shared: Shared[str, int] = Shared("job")

        async def work() -> int:
            await asyncio.sleep(0.01)
            raise ValueError("boom")

        results = await asyncio.gather(*(shared.run("k", work) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        assert len(shared) == 0

    asyncio.run(main())


def test_one_cancelled_waiter_does_not_stop_the_others() -> None:
    async def main() -> None:
        shared: Shared[str, str] = Shared("job")
        gate = asyncio.Event()

        async def work() -> str:
            await gate.wait()
            return "done"

        impatient = asyncio.ensure_future(shared.run("k", work))
        patient = asyncio.ensure_future(shared.run("k", work))
        await asyncio.sleep(0)
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        assert shared.running("k")
        gate.set()
        assert await patient == "done"

    asyncio.run(main())


def test_last_waiter_leaving_cancels_the_task_and_forgets_it() -> None:
    async def main() -> None:
        shared: Shared[str, str] = Shared("job")
        cancelled = asyncio.Event()
        runs = 0

        async def work() -> str:
            nonlocal runs
            runs += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return "never"

        waiter = asyncio.ensure_future(shared.run("k", work))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not shared.running("k")  # a new caller starts afresh at once
        await asyncio.wait_for(cancelled.wait(), 5)

        async def quick() -> str:
            return "fresh"

        assert await shared.run("k", quick) == "fresh"
        assert runs == 1

    asyncio.run(main())
