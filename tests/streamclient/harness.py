"""Test harness: a streaming server on 127.0.0.1 with a given backend.

(The server side of the tests; the client modules beside it never import
crib's code.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from api import api_pb2
from cri.streaming.server import StreamingServer
from cri.streaming.spdy_session import SessionOptions
from tests.streamclient.fake_backend import FakeBackend

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run a test coroutine; the timeout only guards against a hang."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@asynccontextmanager
async def serving(backend: Any = None, *, url_ttl: float = 60.0,
                  session_options: SessionOptions | None = None,
                  creation_timeout: float = 30.0) -> AsyncIterator[StreamingServer]:
    server = StreamingServer(backend or FakeBackend(), "127.0.0.1", 0, url_ttl=url_ttl,
                             stream_creation_timeout=creation_timeout,
                             session_options=session_options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        assert server.active_connections == 0


def exec_request(cmd: list[str], *, stdin: bool = False, stdout: bool = True,
                 stderr: bool = True, tty: bool = False,
                 container_id: str = "c1") -> api_pb2.ExecRequest:
    return api_pb2.ExecRequest(container_id=container_id, cmd=cmd, stdin=stdin,
                               stdout=stdout, stderr=stderr and not tty, tty=tty)
