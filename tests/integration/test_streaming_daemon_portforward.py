"""PortForward through a real daemon: busybox httpd inside a pod on the test
CNI network (and in a host-network pod), reached over SPDY/3.1 and WebSocket
with the spec-written clients: 50 MB intact, 20 connections at once, a
refused port reported on the error stream, nothing left in the daemon."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from pathlib import Path

import pytest

from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import CtrCrib, ctr_crib, remove
from tests.integration.streamdaemon import (
    BIG,
    HTTP_PORT,
    SMALL,
    baseline,
    httpd,
    new_pod,
    portforward_url,
    run,
    www,
)
from tests.integration.test_sandbox_run import NODE
from tests.streamclient.commands import spdy_forward_streams, spdy_portforward
from tests.streamclient.spdy_client import SpdyClient
from tests.streamclient.ws_client import WsClient

pytestmark = pytest.mark.integration
__all__ = ["ctr_crib"]

def http_get(path: str) -> bytes:
    return f"GET /{path} HTTP/1.0\r\nHost: pod\r\n\r\n".encode()


def body_digest(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head[:200]
    return len(body), hashlib.sha256(body).hexdigest()


async def spdy_get(client: SpdyClient, port: int, request_id: int, path: str) -> bytes:
    error, data = await spdy_forward_streams(client, port, request_id)
    await data.write(http_get(path))
    await data.close()
    response, err = await asyncio.gather(data.read_all(), error.read_all())
    assert err == b""
    return response


async def ws_get(url: str, port: int, path: str) -> bytes:
    ws = await WsClient.connect(url, ["v4.channel.k8s.io"])
    for channel in (0, 1):  # each channel opens with the port, little-endian
        assert await ws.recv_channel() == (channel, port.to_bytes(2, "little"))
    await ws.send_channel(0, http_get(path))
    out = bytearray()
    while (msg := await ws.recv_channel()) is not None:
        assert msg[0] == 0, msg
        out += msg[1]
    await ws.close()
    return bytes(out)


def test_port_forward_into_the_pod(ctr_crib: CtrCrib, test_registry: SeededRegistry,
                                   tmp_path: Path) -> None:
    pod = new_pod(ctr_crib, test_registry)
    d = pod.d
    root, digests = www(tmp_path)
    cid = httpd(pod, root, str(HTTP_PORT))
    base = baseline(d, cid)

    async def scenario() -> None:
        client = await spdy_portforward(portforward_url(d, pod.sid))
        assert body_digest(await spdy_get(client, HTTP_PORT, 0, "big")) == (BIG, digests["big"])
        replies = await asyncio.gather(*(spdy_get(client, HTTP_PORT, i, "small")
                                         for i in range(1, 21)))
        assert {body_digest(r) for r in replies} == {(SMALL, digests["small"])}
        assert client.violations == []
        # a port nobody listens on: the error stream says so, the session goes on
        error, data = await spdy_forward_streams(client, 9, 99)
        await data.close()
        assert b"cannot connect to localhost:9" in await error.read_all()
        assert body_digest(await spdy_get(client, HTTP_PORT, 100, "small"))[0] == SMALL
        await client.close()
        # WebSocket: the ports come with the request
        url = portforward_url(d, pod.sid, (HTTP_PORT,))
        assert body_digest(await ws_get(url, HTTP_PORT, "big")) == (BIG, digests["big"])
        replies = await asyncio.gather(*(
            ws_get(portforward_url(d, pod.sid, (HTTP_PORT,)), HTTP_PORT, "small")
            for _ in range(20)))
        assert {body_digest(r) for r in replies} == {(SMALL, digests["small"])}

    run(scenario())
    base.check()
    remove(d, cid)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_port_forward_to_a_host_network_pod(ctr_crib: CtrCrib,
                                            test_registry: SeededRegistry,
                                            tmp_path: Path) -> None:
    pod = new_pod(ctr_crib, test_registry, "hostnet", network=NODE)
    root, digests = www(tmp_path)
    port = free_loopback_port()
    cid = httpd(pod, root, f"127.0.0.1:{port}")

    async def scenario() -> None:
        client = await spdy_portforward(portforward_url(pod.d, pod.sid))
        replies = await asyncio.gather(*(spdy_get(client, port, i, "small") for i in range(5)))
        assert {body_digest(r) for r in replies} == {(SMALL, digests["small"])}
        await client.close()

    base = baseline(pod.d, cid)
    run(scenario())
    base.check()
    remove(pod.d, cid)
