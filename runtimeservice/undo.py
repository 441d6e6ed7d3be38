"""A stack of undo steps for multi-step operations (RunPodSandbox, CreateContainer).

Each step that creates something registers how to remove it. If the operation
fails (or is cancelled) before `commit()`, the steps run in reverse order;
an undo step that fails is logged and the rest still run, so one stuck
resource never hides the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

UndoFn = Callable[[], Awaitable[Any] | Any]


class UndoStack:
    def __init__(self, what: str) -> None:
        self.what = what
        self._steps: list[tuple[str, UndoFn]] = []

    def push(self, description: str, fn: UndoFn) -> None:
        self._steps.append((description, fn))

    def commit(self) -> None:
        self._steps.clear()

    async def unwind(self) -> None:
        while self._steps:
            description, fn = self._steps.pop()
            try:
                result = fn()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    # Shielded: a cancelled RPC must still finish its cleanup.
                    await asyncio.shield(result)
            except Exception:
                log.exception("%s: undo step %r failed", self.what, description)

    async def __aenter__(self) -> UndoStack:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc_type is not None:
            log.info("%s failed (%s); undoing %d step(s)", self.what,
                     exc_type.__name__, len(self._steps))
            await self.unwind()
