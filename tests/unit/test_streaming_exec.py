"""Exec and attach through the streaming server, over SPDY and WebSocket, with
a scripted backend: output, exit status, stdin, TTY resize, protocol versions,
and a client that vanishes."""

from __future__ import annotations

import asyncio
import json

import pytest

from api import api_pb2
from tests.streamclient.commands import SpdyCommand, spdy_exec, ws_collect, ws_exec
from tests.streamclient.fake_backend import FakeBackend
from tests.streamclient.harness import exec_request, run, serving
from tests.streamclient.ws_client import WsClient

NONZERO_3 = (b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero '
             b'exit code: error executing command [exit 3], exit code 3","reason":'
             b'"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}')
SUCCESS = b'{"metadata":{},"status":"Success"}'


@pytest.mark.parametrize("protocol", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
def test_spdy_echo_and_exit_code(protocol: str) -> None:
    async def main() -> None:
        async with serving() as srv:
            r = await spdy_exec(srv.get_exec_url(exec_request(["echo", "hi"])),
                                protocols=(protocol,))
            assert (r.stdout, r.stderr, r.error, r.protocol) == (b"hi\n", b"", SUCCESS, protocol)
            r = await spdy_exec(srv.get_exec_url(exec_request(["exit", "3"])),
                                protocols=(protocol,))
            assert r.error == NONZERO_3 and r.exit_code == 3
    run(main())


def test_spdy_version_negotiation_follows_the_client_order() -> None:
    async def main() -> None:
        async with serving() as srv:
            r = await spdy_exec(srv.get_exec_url(exec_request(["echo", "x"])),
                                protocols=("v9.channel.k8s.io", "v3.channel.k8s.io",
                                           "v4.channel.k8s.io"))
            assert r.protocol == "v3.channel.k8s.io"
    run(main())


@pytest.mark.parametrize("protocol", ["v3.channel.k8s.io", "v2.channel.k8s.io"])
def test_spdy_text_status_before_v4(protocol: str) -> None:
    async def main() -> None:
        async with serving() as srv:
            r = await spdy_exec(srv.get_exec_url(exec_request(["echo", "hi"])),
                                protocols=(protocol,))
            assert (r.stdout, r.error) == (b"hi\n", b"")   # nothing on success
            r = await spdy_exec(srv.get_exec_url(exec_request(["exit", "3"])),
                                protocols=(protocol,))
            assert r.error == (b"command terminated with non-zero exit code: error executing "
                               b"command [exit 3], exit code 3")
    run(main())


def test_spdy_v1_resets_the_error_stream() -> None:
    async def main() -> None:
        async with serving() as srv:
            url = srv.get_exec_url(exec_request(["exit", "3"]))
            cmd = await SpdyCommand.open(url, protocols=("channel.k8s.io",))
            with pytest.raises(ConnectionResetError):
                await cmd.error.read_all()
            await cmd.client.close()
    run(main())


def test_stderr_and_internal_errors() -> None:
    async def main() -> None:
        async with serving() as srv:
            r = await spdy_exec(srv.get_exec_url(exec_request(["stderr", "oops"])))
            assert (r.stdout, r.stderr, r.exit_code) == (b"", b"oops", 1)
            r = await spdy_exec(srv.get_exec_url(exec_request(["fail"])))
            assert r.status == {
                "metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                "message": "Internal error occurred: error executing command in container: "
                           "container c1 not found",
                "details": {"causes": [{"message": "error executing command in container: "
                                                   "container c1 not found"}]}}
    run(main())


@pytest.mark.parametrize("flow_control", [True, False])
def test_stdin_piped_then_closed_ends_the_process(flow_control: bool) -> None:
    async def main() -> None:
        data = bytes(range(256)) * 4000
        async with serving() as srv:
            url = srv.get_exec_url(exec_request(["cat"], stdin=True))
            r = await spdy_exec(url, stdin=data, flow_control=flow_control, window=4096)
            assert r.stdout == data and r.exit_code == 0
            url = srv.get_exec_url(exec_request(["wc"], stdin=True))
            r = await ws_exec(url, stdin=data)
            assert r.stdout == b"%d\n" % len(data) and r.exit_code == 0
    run(main())


def test_large_output_with_small_windows_and_without_flow_control() -> None:
    async def main() -> None:
        async with serving() as srv:
            for fc in (True, False):
                url = srv.get_exec_url(exec_request(["big", str(1 << 20)]))
                r = await spdy_exec(url, flow_control=fc, window=2048)
                assert len(r.stdout) == 1 << 20 and r.exit_code == 0
            r = await ws_exec(srv.get_exec_url(exec_request(["big", str(1 << 20)])))
            assert len(r.stdout) == 1 << 20
    run(main())


def test_tty_resize_reaches_the_backend() -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with serving(backend) as srv:
            url = srv.get_exec_url(exec_request(["stty-size", "2"], tty=True, stdin=True))
            cmd = await SpdyCommand.open(url, stdin=True, stderr=False, tty=True)
            assert cmd.resize is not None and cmd.stderr is None
            await cmd.send_resize(80, 24)
            assert await cmd.stdout.read() == b"24 80\n"   # type: ignore[union-attr]
            await cmd.resize.write(b'{"width":100,"height":50}')   # Go matches keys loosely
            r = await cmd.collect()
            assert (r.stdout, r.exit_code) == (b"50 100\n", 0)
            url = srv.get_exec_url(exec_request(["stty-size"], tty=True, stdin=True))
            r = await ws_exec(url, resizes=((132, 43),))
            assert (r.stdout, r.exit_code) == (b"43 132\n", 0)
            assert [c.tty for c in backend.calls] == [True, True]
            assert [(s.width, s.height) for s in backend.calls[1].resizes] == [(132, 43)]
    run(main())


@pytest.mark.parametrize("protocol", ["v4.channel.k8s.io", "v4.base64.channel.k8s.io",
                                      "channel.k8s.io", "base64.channel.k8s.io", None])
def test_websocket_protocol_variants(protocol: str | None) -> None:
    async def main() -> None:
        async with serving() as srv:
            url = srv.get_exec_url(exec_request(["exit", "3"]))
            ws = await WsClient.connect(url, [protocol] if protocol else [])
            assert ws.subprotocol == (protocol or "")
            r = await ws_collect(ws)
            if protocol and protocol.startswith("v4."):
                assert r.error == NONZERO_3
            else:
                assert r.error.startswith(b"command terminated with non-zero exit code")
            url = srv.get_exec_url(exec_request(["cat"], stdin=True))
            ws = await WsClient.connect(url, [protocol] if protocol else [])
            await ws.send_channel(0, b"ping")
            assert await ws.recv_channel() == (1, b"")      # the "ready" message
            assert await ws.recv_channel() == (1, b"ping")
            await ws.close()
    run(main())


def test_websocket_v5_close_signal_ends_stdin_only() -> None:
    async def main() -> None:
        async with serving() as srv:
            url = srv.get_exec_url(exec_request(["wc"], stdin=True))
            r = await ws_exec(url, stdin=b"abc" * 1000)
            assert (r.stdout, r.error) == (b"3000\n", SUCCESS)
    run(main())


def test_attach_echoes_stdin_and_reports_errors() -> None:
    async def main() -> None:
        async with serving() as srv:
            req = api_pb2.AttachRequest(container_id="c1", stdin=True, stdout=True)
            r = await spdy_exec(srv.get_attach_url(req), stdin=b"hello\n", stderr=False)
            assert (r.stdout, r.error) == (b"hello\n", SUCCESS)
            r = await ws_exec(srv.get_attach_url(req), stdin=b"again\n")
            assert (r.stdout, r.error) == (b"again\n", SUCCESS)
            req = api_pb2.AttachRequest(container_id="missing", stdin=True, stdout=True)
            r = await spdy_exec(srv.get_attach_url(req), stdin=b"", stderr=False)
            assert r.status is not None and r.status["message"] == (
                "Internal error occurred: error attaching to container: "
                "container missing not found")
    run(main())


@pytest.mark.parametrize("transport", ["spdy", "websocket"])
def test_a_vanished_client_cancels_the_command(transport: str) -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with serving(backend) as srv:
            url = srv.get_exec_url(exec_request(["sleep"], stdin=True))
            if transport == "spdy":
                cmd = await SpdyCommand.open(url, stdin=True)
                await backend.started.wait()
                cmd.client.writer.transport.abort()
            else:
                ws = await WsClient.connect(url, ["v5.channel.k8s.io"])
                await backend.started.wait()
                ws.abort()
            await backend.cancelled.wait()
            assert backend.calls[0].cancelled and not backend.calls[0].finished
            while srv.active_connections:
                await asyncio.sleep(0.01)
    run(main())


def test_missing_streams_time_out() -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with serving(backend, creation_timeout=0.2) as srv:
            url = srv.get_exec_url(exec_request(["echo", "x"], stdin=True))
            from tests.streamclient.commands import spdy_headers
            from tests.streamclient.http_upgrade import upgrade
            from tests.streamclient.spdy_client import SpdyClient
            up = await upgrade(url, spdy_headers(["v4.channel.k8s.io"]))
            client = SpdyClient(up.reader, up.writer, up.leftover)
            await client.start()
            await client.open_stream({"streamType": "error"})
            assert client.task is not None
            await client.task          # the server gives up and closes the connection
            assert client.goaway is not None and backend.calls == []
            await client.close()
    run(main())


def test_status_json_escapes_like_go() -> None:
    from cri.streaming.remotecommand import go_json, internal_error
    assert go_json({"m": "<a&b>\u2028é"}) == '{"m":"\\u003ca\\u0026b\\u003e\\u2028é"}'.encode()
    assert json.loads(internal_error("x").as_json())["code"] == 500
