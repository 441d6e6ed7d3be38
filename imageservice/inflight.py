"""Work that concurrent callers share: one task per key, stopped when nobody waits for it.

``await shared.run(key, start)`` starts ``start()`` as a task the first time a
key is asked for and joins it afterwards, so ten identical pulls make one
download. The task is *shielded* from each caller: a caller that is cancelled
(its client went away, or its deadline passed) only leaves; when the last
caller leaves, the task itself is cancelled and forgotten at once, so a new
caller starts afresh instead of joining a task that is winding down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass
class _Op(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


class Shared(Generic[K, T]):
    """Shared tasks by key; see the module docstring."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._ops: dict[K, _Op[T]] = {}

    def __len__(self) -> int:
        return len(self._ops)

    def running(self, key: K) -> bool:
        return key in self._ops

    async def run(self, key: K, start: Callable[[], Awaitable[T]]) -> T:
        """The result of the task for ``key``, starting it with ``start()`` if none runs."""
        op = self._ops.get(key)
        if op is None:
            op = _Op(asyncio.ensure_future(start()))
            self._ops[key] = op
            op.task.add_done_callback(lambda task: self._finished(key, task))
        else:
            log.debug("joining the %s already in progress for %s", self.what, key)
        op.waiters += 1
        try:
            return await asyncio.shield(op.task)
        finally:
            op.waiters -= 1
            if op.waiters == 0 and not op.task.done():
                log.info("nobody waits for the %s of %s any more: stopping it", self.what, key)
                if self._ops.get(key) is op:
                    del self._ops[key]
                op.task.cancel()

    def _finished(self, key: K, task: asyncio.Task[T]) -> None:
        op = self._ops.get(key)
        if op is not None and op.task is task:
            del self._ops[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waited for is not "never retrieved"
