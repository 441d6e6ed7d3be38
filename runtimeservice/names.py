"""Name reservations with in-flight joining, for RunPodSandbox and CreateContainer.

The kubelet retries a call that timed out while the runtime is still working on
it. So a creation runs in its own task, detached from the RPC that started it:
a cancelled first call does not abort the work, and an identical retry (same
request bytes) joins the task and gets the same id. A different request for a
name that is taken, or being taken, is ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from cri.errors import AlreadyExists


def fingerprint(request: Message) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


@dataclass
class _Owner:
    ident: str
    fingerprint: str


class Reservations:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._owners: dict[str, _Owner] = {}
        self._inflight: dict[str, tuple[str, asyncio.Task[str]]] = {}

    def restore(self, name: str, ident: str, fp: str = "") -> None:
        """Re-register a name held by a recovered object."""
        self._owners[name] = _Owner(ident, fp)

    def release(self, name: str, ident: str) -> None:
        owner = self._owners.get(name)
        if owner is not None and owner.ident == ident:
            del self._owners[name]

    def owner(self, name: str) -> str | None:
        owner = self._owners.get(name)
        return owner.ident if owner else None

    async def create_once(self, name: str, fp: str,
                          create: Callable[[], Awaitable[str]]) -> str:
        """Run `create` for `name` unless an identical request already did or is doing it."""
        running = self._inflight.get(name)
        if running is not None:
            if running[0] == fp:
                return await asyncio.shield(running[1])
            raise AlreadyExists(f"{self.kind} name {name!r} is being created by another request")
        owner = self._owners.get(name)
        if owner is not None:
            if owner.fingerprint and owner.fingerprint == fp:
                return owner.ident
            raise AlreadyExists(f"{self.kind} name {name!r} is already in use by {owner.ident}")
        task = asyncio.create_task(self._run(name, fp, create), name=f"create {name}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._inflight[name] = (fp, task)
        return await asyncio.shield(task)

    async def _run(self, name: str, fp: str, create: Callable[[], Awaitable[str]]) -> str:
        try:
            ident = await create()
            self._owners[name] = _Owner(ident, fp)
            return ident
        finally:
            del self._inflight[name]
