"""Finishing clean-up when the caller is being cancelled.

A streaming session can be cancelled twice in quick succession (its client
vanished while its command was failing, or the daemon is stopping): a
clean-up that awaits must still run to the end, or descriptors and processes
leak. `complete` shields one awaitable until it is done and re-raises the
cancellation afterwards; `settle` cancels tasks and waits for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def complete(aw: Awaitable[T]) -> T:
    """Await `aw` to the end even if we are cancelled meanwhile; a cancellation
    that arrived is re-raised once it is done."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


async def settle(tasks: Iterable[asyncio.Task[Any]]) -> list[BaseException]:
    """Cancel `tasks` and wait until all have finished (see `complete`); the
    exceptions they ended with, other than cancellation."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    results = await complete(asyncio.gather(*pending, return_exceptions=True))
    return [r for r in results
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
