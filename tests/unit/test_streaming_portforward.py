"""Port-forward through the streaming server to a TCP server on 127.0.0.1
(the backend answers "host network"), over SPDY and WebSocket."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from api import api_pb2
from cri.streaming import portforward
from tests.streamclient.commands import (
    spdy_forward_streams,
    spdy_portforward,
    spdy_request,
)
from tests.streamclient.harness import run, serving
from tests.streamclient.ws_client import WsClient


@asynccontextmanager
async def digest_server() -> AsyncIterator[int]:
    """Reads until EOF, answers with the SHA-256 of what it read; "GET n" sends n bytes."""
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.read(4)
        if first == b"GET ":
            n = int(await r.readline())
            w.write(os.urandom(16) * (n // 16))
        else:
            h = hashlib.sha256(first)
            while data := await r.read(65536):
                h.update(data)
            w.write(h.hexdigest().encode())
        await w.drain()
        w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_spdy_half_close_and_many_connections() -> None:
    async def main() -> None:
        async with digest_server() as port, serving() as srv:
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
            client = await spdy_portforward(url, window=16384)
            payloads = [os.urandom(50_000 + i) for i in range(20)]
            replies = await asyncio.gather(*(spdy_request(client, port, i, p)
                                             for i, p in enumerate(payloads)))
            for (data, err), p in zip(replies, payloads, strict=True):
                assert (data, err) == (hashlib.sha256(p).hexdigest().encode(), b"")
            assert client.violations == []
            await client.close()
    run(main())


def test_spdy_download_without_flow_control(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pod closes first and the client never half-closes (client-go waits
    for the error stream first): the forward still ends, after a grace."""
    monkeypatch.setattr(portforward, "HALF_CLOSE_GRACE", 0.05)

    async def main() -> None:
        async with digest_server() as port, serving() as srv:
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
            client = await spdy_portforward(url, flow_control=False)
            error, data = await spdy_forward_streams(client, port, 0)
            await data.write(b"GET 2000000\n")
            got, err = await asyncio.gather(data.read_all(), error.read_all())
            assert len(got) == 2_000_000 and err == b""
            await client.close()
    run(main())


def test_spdy_errors_go_to_the_error_stream() -> None:
    async def main() -> None:
        async with serving() as srv:
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p1"))
            client = await spdy_portforward(url)
            port = closed_port()
            data, err = await spdy_request(client, port, 1, b"x")
            assert data == b""
            assert err.startswith(f"error forwarding port {port} to pod p1, uid : cannot "
                                  f"connect to localhost:{port} on the host".encode())
            # streams without a valid port or type are refused
            for headers in ({"streamType": "data"},
                            {"streamType": "data", "port": "0"},
                            {"streamType": "stdin", "port": "80"}):
                try:
                    await client.open_stream(headers)
                    raise AssertionError(f"{headers} accepted")
                except ConnectionResetError:
                    pass
            await client.close()
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="missing"))
            client = await spdy_portforward(url)
            _, err = await spdy_request(client, 80, 1, b"x")
            assert err == b"error forwarding port 80 to pod missing, uid : pod sandbox " \
                          b"missing not found"
            await client.close()
    run(main())


def test_spdy_pairs_without_request_id() -> None:
    """Old clients send no requestID: streams n (error) and n+2 (data) pair up."""
    async def main() -> None:
        async with digest_server() as port, serving() as srv:
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
            client = await spdy_portforward(url)
            error = await client.open_stream({"streamType": "error", "port": str(port)})
            await error.close()
            data = await client.open_stream({"streamType": "data", "port": str(port)})
            await data.write(b"abc")
            await data.close()
            assert await data.read_all() == hashlib.sha256(b"abc").hexdigest().encode()
            assert await error.read_all() == b""
            await client.close()
    run(main())


def test_websocket_port_forward() -> None:
    async def main() -> None:
        async with digest_server() as port, serving() as srv:
            dead = closed_port()
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(
                pod_sandbox_id="p", port=[port, dead]))
            ws = await WsClient.connect(url, ["v4.channel.k8s.io"])
            tags = {}
            for _ in range(4):   # the first message of every channel is its port
                msg = await ws.recv_channel()
                assert msg is not None
                tags[msg[0]] = int.from_bytes(msg[1], "little")
            assert tags == {0: port, 1: port, 2: dead, 3: dead}
            await ws.send_channel(0, b"GET 1000000\n")
            got = bytearray()
            errors = {}
            while (msg := await ws.recv_channel()) is not None:
                if msg[0] == 0:
                    got += msg[1]
                else:
                    errors[msg[0]] = errors.get(msg[0], b"") + msg[1]
            assert len(got) == 1_000_000
            assert b"cannot connect to localhost" in errors[3] and 1 not in errors
            await ws.close()
            # ports from the query when the request names none; base64 variant
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
            ws = await WsClient.connect(f"{url}?port={port}", ["v4.base64.channel.k8s.io"])
            assert await ws.recv_channel() == (0, port.to_bytes(2, "little"))
            assert await ws.recv_channel() == (1, port.to_bytes(2, "little"))
            await ws.send_channel(0, b"GET 32\n")
            assert len((await ws.recv_channel() or (0, b""))[1]) == 32
            await ws.close()
    run(main())
