"""Exec and Attach through a real daemon: images from the test registry, pods
on the test CNI network, real runc and conmon, and the spec-written SPDY/3.1
and WebSocket clients of tests/streamclient. (Port-forward, and kubectl
itself, in the modules beside this one.)

After each scenario the daemon must be as it was: no child process (the
runtime's exec), no exec'd process left in a container, the same open
descriptors (pidfds on live monitors aside), and still answering.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import grpc
import pytest

from api import api_pb2
from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import (
    CtrCrib,
    code_of,
    ctr_crib,
    remove,
    status,
    wait_state,
)
from tests.integration.daemon import assert_clean_exit
from tests.integration.streamdaemon import (
    SUCCESS,
    attach_url,
    baseline,
    exec_url,
    new_pod,
    portforward_url,
    processes_with,
    run,
    wait_for,
)
from tests.streamclient.commands import SpdyCommand, spdy_exec, ws_exec
from tests.streamclient.http_upgrade import upgrade
from tests.streamclient.interactive import (
    Session,
    SpdySession,
    WsSession,
    read_until,
    wait_for_size,
)
from tests.streamclient.ws_client import WsClient

pytestmark = pytest.mark.integration
__all__ = ["ctr_crib"]

RUNNING = api_pb2.ContainerState.CONTAINER_RUNNING
EXITED = api_pb2.ContainerState.CONTAINER_EXITED
CODE = grpc.StatusCode


# ---------------------------------------------------------------- exec


def test_exec_output_exit_status_and_stdin(ctr_crib: CtrCrib,
                                           test_registry: SeededRegistry) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    cid = pod.run("sleeper", ["sleep", "1000"])
    base = baseline(d, cid)
    assert exec_url(d, cid, ["true"]).startswith("http://127.0.0.1:")

    async def scenario() -> None:
        for protocol in ("v4.channel.k8s.io", "v5.channel.k8s.io"):
            r = await spdy_exec(exec_url(d, cid, ["echo", "hi"]), protocols=(protocol,))
            assert (r.stdout, r.stderr, r.status, r.protocol) == (b"hi\n", b"", SUCCESS,
                                                                   protocol)
            r = await spdy_exec(exec_url(d, cid, ["sh", "-c", "exit 3"]), protocols=(protocol,))
            assert r.exit_code == 3 and r.status is not None
            assert (r.status["status"], r.status["reason"]) == ("Failure", "NonZeroExitCode")
        for protocol in ("v5.channel.k8s.io", "v4.channel.k8s.io"):
            r = await ws_exec(exec_url(d, cid, ["echo", "hi"]), protocols=(protocol,))
            assert (r.stdout, r.status, r.protocol) == (b"hi\n", SUCCESS, protocol)
            r = await ws_exec(exec_url(d, cid, ["sh", "-c", "exit 3"]), protocols=(protocol,))
            assert r.exit_code == 3
        r = await spdy_exec(exec_url(d, cid, ["sh", "-c", "echo out; echo err >&2"]))
        assert (r.stdout, r.stderr) == (b"out\n", b"err\n")
        # stdin piped and closed ends the process
        data = os.urandom(2 * 1024 * 1024)
        r = await spdy_exec(exec_url(d, cid, ["cat"], stdin=True), stdin=data)
        assert r.stdout == data and r.status == SUCCESS
        r = await ws_exec(exec_url(d, cid, ["sha256sum"], stdin=True), stdin=data)
        assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()

    run(scenario())
    base.check()
    remove(d, cid)


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_interactive_exec_with_a_tty_and_resize(ctr_crib: CtrCrib,
                                                test_registry: SeededRegistry,
                                                transport: str) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    cid = pod.run("sleeper", ["sleep", "1000"])
    base = baseline(d, cid)

    async def scenario() -> None:
        url = exec_url(d, cid, ["sh"], stdin=True, tty=True)
        session: Session = await (SpdySession.open(url, tty=True) if transport == "spdy"
                                  else WsSession.open(url))
        await session.resize(132, 43)
        await wait_for_size(session, 43, 132)
        await session.resize(80, 24)
        await wait_for_size(session, 24, 80)
        await session.send(b"tty\n")
        assert b"/dev/pts/" in await read_until(session, b"/dev/pts/")
        await session.send(b"exit 5\n")
        assert (await session.finish()).exit_code == 5

    run(scenario())
    base.check()
    remove(d, cid)


@pytest.mark.parametrize("tty", [False, True])
def test_a_vanished_client_frees_the_exec_process(ctr_crib: CtrCrib,
                                                  test_registry: SeededRegistry,
                                                  tty: bool) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    cid = pod.run("sleeper", ["sleep", "1000"])
    base = baseline(d, cid)
    marker = "4242"

    async def vanish(transport: str) -> None:
        url = exec_url(d, cid, ["sh", "-c", f"echo started; sleep {marker}"], stdin=True,
                       tty=tty)
        session: Session = await (
            SpdySession.open(url, tty=tty, stderr=not tty) if transport == "spdy"
            else WsSession.open(url))
        await read_until(session, b"started")
        assert processes_with(f"sleep {marker}") != []
        session.abort()

    for transport in ("spdy", "websocket"):
        run(vanish(transport))
        wait_for(lambda: processes_with(f"sleep {marker}") == [],
                 f"the exec to be killed: {processes_with(f'sleep {marker}')}")
        base.check()
    assert status(d, cid).state == RUNNING
    remove(d, cid)


# ---------------------------------------------------------------- attach


def test_attach_to_a_running_shell_reading_stdin(ctr_crib: CtrCrib,
                                                 test_registry: SeededRegistry) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    cid = pod.run("shell", ["sh"], stdin=True)
    base = baseline(d, cid)

    async def scenario() -> None:
        cmd = await SpdyCommand.open(attach_url(d, cid), stdin=True)
        assert cmd.stdin is not None and cmd.stdout is not None
        await cmd.stdin.write(b"echo attached to $((6 * 7))\n")
        got = b""
        while b"attached to 42" not in got:
            chunk = await cmd.stdout.read()
            assert chunk, got
            got += chunk
        # A second client comes and vanishes: the container and the first stay.
        other = await WsClient.connect(attach_url(d, cid), ["v5.channel.k8s.io"])
        other.abort()
        await cmd.stdin.write(b"echo bye >&2; exit 4\n")
        r = await cmd.collect()
        assert b"bye" in r.stderr and r.status == SUCCESS

    run(scenario())
    assert wait_state(d, cid, EXITED).exit_code == 4
    base.check()
    remove(d, cid)


def test_attach_with_a_tty(ctr_crib: CtrCrib, test_registry: SeededRegistry) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    cid = pod.run("term", ["sh"], stdin=True, tty=True)
    base = baseline(d, cid)

    async def scenario() -> None:
        session = await WsSession.open(attach_url(d, cid, tty=True))
        await session.resize(100, 30)
        await wait_for_size(session, 30, 100)
        await session.send(b"exit\n")
        assert (await session.finish()).status == SUCCESS

    run(scenario())
    wait_state(d, cid, EXITED)
    base.check()
    remove(d, cid)


# ---------------------------------------------------------------- refusals


def test_refused_requests_and_urls(ctr_crib: CtrCrib, test_registry: SeededRegistry) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    cid = pod.run("sleeper", ["sleep", "1000"])
    done = pod.run("done", ["true"])
    wait_state(d, done, EXITED)
    missing = "f" * 64

    def exec_call(container: str, cmd: list[str]) -> Callable[[], object]:
        return lambda: d.runtime.Exec(api_pb2.ExecRequest(container_id=container, cmd=cmd,
                                                          stdout=True), timeout=10)

    code, message = code_of(exec_call(missing, ["true"]))
    assert code == CODE.NOT_FOUND and missing in message
    code, message = code_of(exec_call(done, ["true"]))
    assert code == CODE.FAILED_PRECONDITION and "not running" in message
    code, message = code_of(exec_call(cid, []))
    assert code == CODE.INVALID_ARGUMENT
    code, message = code_of(lambda: d.runtime.Attach(api_pb2.AttachRequest(
        container_id=done, stdout=True), timeout=10))
    assert code == CODE.FAILED_PRECONDITION
    code, message = code_of(lambda: d.runtime.PortForward(api_pb2.PortForwardRequest(
        pod_sandbox_id=missing), timeout=10))
    assert code == CODE.NOT_FOUND
    # a prefix names the container; the URL is bound to its full id
    url = exec_url(d, cid[:12], ["echo", "prefix"])

    async def scenario() -> None:
        assert (await spdy_exec(url)).stdout == b"prefix\n"
        # a used, an unknown and a malformed URL
        for bad in (url, url.rsplit("/", 1)[0] + "/not-a-token"):
            up = await upgrade(bad, [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"),
                                     ("X-Stream-Protocol-Version", "v4.channel.k8s.io")])
            assert up.status == 404
        up = await upgrade(exec_url(d, cid, ["true"]), [("Connection", "keep-alive")])
        assert up.status == 400

    run(scenario())
    d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.sid), timeout=60)
    code, message = code_of(lambda: portforward_url(d, pod.sid))
    assert code == CODE.FAILED_PRECONDITION and "not ready" in message
    remove(d, cid)
    remove(d, done)


# ---------------------------------------------------------------- daemon stop


def test_a_daemon_stop_ends_the_sessions_but_not_the_containers(
        ctr_crib: CtrCrib, test_registry: SeededRegistry) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    shell = pod.run("shell", ["sh"], stdin=True)
    sleeper = pod.run("sleeper", ["sleep", "1000"])
    marker = "sleep 5151"

    async def scenario() -> None:
        url = exec_url(d, sleeper, ["sh", "-c", f"echo started; {marker}"], stdin=True)
        exec_session = await SpdySession.open(url, tty=False, stderr=True)
        await read_until(exec_session, b"started")
        attach = await SpdyCommand.open(attach_url(d, shell), stdin=True)
        assert attach.stdin is not None and attach.stdout is not None
        await attach.stdin.write(b"echo attached\n")
        assert b"attached" in await attach.stdout.read()
        assert_clean_exit(d, d.stop())  # (blocks this loop: the daemon does the work)
        assert processes_with(marker) == []
        # both sessions end (reset, or closed) without a status: nothing finished
        for ending in (exec_session.finish(), attach.collect()):
            try:
                result = await ending
            except ConnectionError:
                continue
            assert result.status is None, result

    run(scenario())
    d.start()
    assert status(d, shell).state == RUNNING and status(d, sleeper).state == RUNNING
    r = run(spdy_exec(exec_url(d, sleeper, ["echo", "again"])))
    assert r.stdout == b"again\n"
    remove(d, shell)
    remove(d, sleeper)
