"""The streaming backend on real runc and conmon: a ContainerManager (from
`containerenv`) behind crib's streaming server, driven by the spec-written
clients in tests/streamclient. Exec with pipes and with a TTY, attach through
conmon's socket, a client that vanishes; the test process hosts the backend,
so its own descriptors are counted to prove none leaked."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from api import api_pb2
from cri.streaming.server import StreamingServer
from runtimeservice.container import ContainerState
from runtimeservice.containers import ContainerManager
from runtimeservice.sandbox import SandboxRecord
from runtimeservice.streaming_backend import ContainerStreamingBackend
from tests.integration.containerenv import ContainerEnv, await_until, busybox_rootfs, cenv, run
from tests.streamclient.commands import SpdyCommand, spdy_exec, ws_exec
from tests.streamclient.interactive import (
    Session,
    SpdySession,
    WsSession,
    read_until,
    wait_for_size,
)
from tests.streamclient.spdy_client import ClientStream
from tests.streamclient.ws_client import WsClient

pytestmark = pytest.mark.integration
__all__ = ["busybox_rootfs", "cenv"]

SUCCESS = {"metadata": {}, "status": "Success"}


def open_fds() -> set[str]:
    """Our descriptors, by number and what they point at."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed since
            found.add(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
    return found


@asynccontextmanager
async def streaming(cenv: ContainerEnv) -> AsyncIterator[tuple[ContainerManager,
                                                               StreamingServer]]:
    """A started manager and a streaming server on an ephemeral loopback port."""
    async with cenv.started() as mgr:
        server = StreamingServer(ContainerStreamingBackend(mgr, cenv.sandboxes.resolve),
                                 "127.0.0.1", 0)
        await server.start()
        try:
            yield mgr, server
        finally:
            await server.stop()


async def settled(srv: StreamingServer, before: set[str]) -> None:
    """Every session over and our descriptors back to what they were (but the
    pidfds the container manager holds on live monitors)."""
    await await_until(lambda: srv.active_connections == 0, "the sessions to end")
    now = open_fds()
    assert {e for e in now if "pidfd" not in e} == {e for e in before if "pidfd" not in e}


async def running(cenv: ContainerEnv, mgr: ContainerManager, pod: SandboxRecord, name: str,
                  args: list[str], **kw: object) -> str:
    cid = await mgr.create(cenv.request(pod, cenv.config(name, args, **kw)))
    await mgr.start_container(cid)
    return cid


def exec_req(cid: str, cmd: list[str], *, stdin: bool = False, tty: bool = False
             ) -> api_pb2.ExecRequest:
    return api_pb2.ExecRequest(container_id=cid, cmd=cmd, stdin=stdin, stdout=True,
                               stderr=not tty, tty=tty)


async def stream_until(stream: ClientStream, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = await stream.read()
        if not chunk:
            raise AssertionError(f"stream ended before {marker!r}; got {got!r}")
        got += chunk
    return got


async def removed(cenv: ContainerEnv, mgr: ContainerManager, cid: str) -> None:
    await mgr.remove(cid)
    assert cenv.leftovers() == []


def exec_processes(cenv: ContainerEnv, marker: str) -> list[str]:
    return [c for _, c in cenv.processes() if marker in c]


def test_exec_output_status_and_stdin_over_spdy_and_websocket(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "sleeper", ["sleep", "1000"])
            before = open_fds()
            r = await spdy_exec(srv.get_exec_url(exec_req(cid, ["echo", "hi"])))
            assert (r.stdout, r.stderr, r.status) == (b"hi\n", b"", SUCCESS)
            r = await spdy_exec(srv.get_exec_url(
                exec_req(cid, ["sh", "-c", "echo out; echo err >&2; exit 3"])))
            assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
            assert r.status is not None and r.status["reason"] == "NonZeroExitCode"
            r = await ws_exec(srv.get_exec_url(exec_req(cid, ["echo", "hi"])))
            assert (r.stdout, r.status) == (b"hi\n", SUCCESS)
            r = await ws_exec(srv.get_exec_url(exec_req(cid, ["sh", "-c", "exit 3"])))
            assert r.exit_code == 3
            data = os.urandom(3 * 1024 * 1024)
            r = await spdy_exec(srv.get_exec_url(exec_req(cid, ["cat"], stdin=True)),
                                stdin=data)
            assert r.stdout == data and r.status == SUCCESS
            r = await ws_exec(srv.get_exec_url(exec_req(cid, ["wc", "-c"], stdin=True)),
                              stdin=b"x" * 100000)
            assert r.stdout.strip() == b"100000" and r.status == SUCCESS
            await settled(srv, before)
            await removed(cenv, mgr, cid)

    run(scenario())


def test_exec_failures_reach_the_error_stream(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "sleeper", ["sleep", "1000"])
            r = await spdy_exec(srv.get_exec_url(exec_req(cid, ["no-such-command"])))
            assert r.status is not None and r.status["status"] == "Failure"
            assert r.status["reason"] == "InternalError", r.status
            assert "no-such-command" in r.status["message"]
            done = await running(cenv, mgr, pod, "done", ["true"])
            await await_until(lambda: mgr.store.get(done).state is ContainerState.EXITED,
                              "the exit")
            r = await spdy_exec(srv.get_exec_url(exec_req(done, ["echo", "hi"])))
            assert r.status is not None and "not running" in r.status["message"], r.status
            await mgr.remove(done)
            await removed(cenv, mgr, cid)

    run(scenario())


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_exec_with_a_tty_and_resizes(cenv: ContainerEnv, transport: str) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "sleeper", ["sleep", "1000"])
            before = open_fds()
            url = srv.get_exec_url(exec_req(cid, ["sh"], stdin=True, tty=True))
            session: Session = await (SpdySession.open(url, tty=True) if transport == "spdy"
                                      else WsSession.open(url))
            await session.resize(100, 40)
            await wait_for_size(session, 40, 100)
            await session.send(b"tty; echo $TERM\n")
            got = await read_until(session, b"xterm")
            assert b"/dev/pts/" in got, got
            await session.resize(120, 33)
            await wait_for_size(session, 33, 120)
            await session.send(b"exit 7\n")
            r = await session.finish()
            assert r.exit_code == 7, r
            await settled(srv, before)
            await removed(cenv, mgr, cid)

    run(scenario())


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
@pytest.mark.parametrize("tty", [False, True])
def test_a_vanished_client_frees_the_exec(cenv: ContainerEnv, transport: str,
                                          tty: bool) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "sleeper", ["sleep", "1000"])
            before = open_fds()
            marker = "1337"
            url = srv.get_exec_url(exec_req(cid, ["sh", "-c", f"echo started; sleep {marker}"],
                                            stdin=True, tty=tty))
            session: Session = await (
                SpdySession.open(url, tty=tty, stderr=not tty) if transport == "spdy"
                else WsSession.open(url))
            await read_until(session, b"started")
            await await_until(lambda: exec_processes(cenv, marker) != [], "the exec")
            session.abort()
            await await_until(lambda: not exec_processes(cenv, marker), "the exec to be killed")
            await settled(srv, before)
            assert mgr.store.get(cid).state is ContainerState.RUNNING
            await removed(cenv, mgr, cid)

    run(scenario())


def test_a_vanished_client_frees_every_job_of_an_interactive_shell(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "sleeper", ["sleep", "1000"])
            before = open_fds()
            session = await WsSession.open(srv.get_exec_url(
                exec_req(cid, ["sh"], stdin=True, tty=True)))
            # with job control each job gets a process group of its own
            await session.send(b"sleep 2718 & sleep 3141 & echo started-$((1+1))\n")
            await read_until(session, b"started-2")
            await await_until(lambda: len(exec_processes(cenv, "sleep ")) == 3, "the jobs")
            session.abort()
            await await_until(lambda: exec_processes(cenv, "sleep 2718") == [] and
                              exec_processes(cenv, "sleep 3141") == [], "the jobs to end")
            await settled(srv, before)
            await removed(cenv, mgr, cid)

    run(scenario())


def test_attach_to_a_shell_reading_stdin(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "shell", ["sh"], stdin=True)
            before = open_fds()
            req = api_pb2.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
            cmd = await SpdyCommand.open(srv.get_attach_url(req), stdin=True)
            assert cmd.stdin is not None and cmd.stdout is not None and cmd.stderr is not None
            await cmd.stdin.write(b"echo attached; echo oops >&2\n")
            assert b"attached" in await stream_until(cmd.stdout, b"attached")
            assert b"oops" in await stream_until(cmd.stderr, b"oops")
            # a second client that vanishes does not disturb the container or the first
            other = await WsClient.connect(srv.get_attach_url(req), ["v5.channel.k8s.io"])
            other.abort()
            await cmd.stdin.write(b"echo still here\n")
            await stream_until(cmd.stdout, b"still here")
            await cmd.stdin.write(b"exit 4\n")
            r = await cmd.collect()
            assert r.status == SUCCESS
            await await_until(lambda: mgr.store.get(cid).state is ContainerState.EXITED,
                              "the exit")
            assert mgr.store.get(cid).exit_code == 4
            await settled(srv, before)
            await removed(cenv, mgr, cid)

    run(scenario())


def test_attach_with_a_tty_resize_and_stdin_once(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            cid = await running(cenv, mgr, pod, "term", ["sh"], stdin=True, tty=True)
            req = api_pb2.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True)
            session = await WsSession.open(srv.get_attach_url(req))
            await session.resize(77, 22)
            await wait_for_size(session, 22, 77)
            await session.send(b"exit\n")
            assert (await session.finish()).status == SUCCESS
            await removed(cenv, mgr, cid)
            # stdin_once: closing the client's input closes the container's stdin
            cid = await running(cenv, mgr, pod, "once", ["cat"], stdin=True, stdin_once=True)
            req = api_pb2.AttachRequest(container_id=cid, stdin=True, stdout=True)
            r = await spdy_exec(srv.get_attach_url(req), stdin=b"one line\n", stderr=False)
            assert r.stdout == b"one line\n" and r.status == SUCCESS
            await await_until(lambda: mgr.store.get(cid).state is ContainerState.EXITED,
                              "the exit")
            await removed(cenv, mgr, cid)

    run(scenario())


def test_attach_and_port_forward_targets_are_checked(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with streaming(cenv) as (mgr, srv):
            pod = await cenv.sandbox()
            backend = srv.backend
            assert await backend.port_forward_target(pod.id) is None  # host network
            cid = await running(cenv, mgr, pod, "done", ["true"])
            await await_until(lambda: mgr.store.get(cid).state is ContainerState.EXITED,
                              "the exit")
            req = api_pb2.AttachRequest(container_id=cid, stdout=True)
            r = await spdy_exec(srv.get_attach_url(req), stderr=False)
            assert r.status is not None and "not running" in r.status["message"]
            assert json.dumps(r.status)
            await removed(cenv, mgr, cid)

    run(scenario())
