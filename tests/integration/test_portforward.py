"""Port-forward into a real network namespace: an HTTP server inside a netns
this test creates, reached through crib's streaming server over SPDY and over
WebSocket (sockets are created inside the namespace by `dial_in_netns`)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api import api_pb2
from cri.streaming.portforward import dial_in_netns
from tests.streamclient.commands import spdy_forward_streams, spdy_portforward
from tests.streamclient.fake_backend import FakeBackend
from tests.streamclient.harness import run, serving
from tests.streamclient.spdy_client import SpdyClient
from tests.streamclient.ws_client import WsClient

pytestmark = pytest.mark.integration

BIG = 50 * 1024 * 1024
SMALL = 1024 * 1024
HTTP_PORT = 8080
# python3's http.server, with a listen backlog that takes 20 simultaneous
# connections (`python3 -m http.server` keeps socketserver's 5 and resets some).
HTTP_SERVER = f"""
import functools, http.server, sys
http.server.ThreadingHTTPServer.request_queue_size = 128
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", {HTTP_PORT}), handler).serve_forever()
"""


@dataclass
class Pod:
    netns: Path
    files: dict[str, str]   # name -> sha256


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    """A network namespace with python3's http.server on 127.0.0.1:8080 inside."""
    name = f"crib-pf-{uuid.uuid4().hex[:8]}"
    netns = Path("/run/netns") / name
    www = tmp_path / "www"
    www.mkdir()
    files = {}
    for fname, size in (("big", BIG), ("small", SMALL)):
        data = os.urandom(size)
        (www / fname).write_bytes(data)
        files[fname] = hashlib.sha256(data).hexdigest()
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        # `ip netns exec` execs the command: this pid is the server's own.
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", HTTP_SERVER, str(www)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def wait_listening() -> None:
            for _ in range(500):
                try:
                    _, w = await dial_in_netns(netns, HTTP_PORT)
                    w.close()
                    return
                except ConnectionRefusedError:
                    await asyncio.sleep(0.02)
            raise AssertionError("http.server did not start in the namespace")

        run(wait_listening())
        yield Pod(netns, files)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        subprocess.run(["ip", "netns", "delete", name], check=True)
    assert not netns.exists()
    assert server is None or server.poll() is not None


def http_get(path: str) -> bytes:
    return f"GET /{path} HTTP/1.0\r\nHost: pod\r\n\r\n".encode()


def body_digest(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:100]
    return len(body), hashlib.sha256(body).hexdigest()


async def spdy_get(client: SpdyClient, request_id: int, path: str) -> bytes:
    error, data = await spdy_forward_streams(client, HTTP_PORT, request_id)
    await data.write(http_get(path))
    await data.close()
    response, err = await asyncio.gather(data.read_all(), error.read_all())
    assert err == b""
    return response


async def ws_get(url: str, path: str) -> bytes:
    ws = await WsClient.connect(url, ["v4.channel.k8s.io"])
    for channel in (0, 1):   # each channel opens with the port, little-endian
        assert await ws.recv_channel() == (channel, HTTP_PORT.to_bytes(2, "little"))
    await ws.send_channel(0, http_get(path))
    out = bytearray()
    while (msg := await ws.recv_channel()) is not None:
        assert msg[0] == 0, msg
        out += msg[1]
    await ws.close()
    return bytes(out)


def test_spdy_50mb_and_20_concurrent_connections(pod: Pod) -> None:
    async def main() -> None:
        async with serving(FakeBackend(netns=pod.netns)) as srv:
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="pod"))
            client = await spdy_portforward(url)
            assert body_digest(await spdy_get(client, 0, "big")) == (BIG, pod.files["big"])
            replies = await asyncio.gather(*(spdy_get(client, i, "small")
                                             for i in range(1, 21)))
            assert {body_digest(r) for r in replies} == {(SMALL, pod.files["small"])}
            assert client.violations == []
            await client.close()
            # the same through a client that does no flow control (like spdystream)
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="pod"))
            client = await spdy_portforward(url, flow_control=False)
            assert body_digest(await spdy_get(client, 0, "big")) == (BIG, pod.files["big"])
            await client.close()
    run(main(), timeout=300)


def test_websocket_50mb_and_20_concurrent_connections(pod: Pod) -> None:
    async def main() -> None:
        async with serving(FakeBackend(netns=pod.netns)) as srv:
            def url() -> str:
                return srv.get_portforward_url(api_pb2.PortForwardRequest(
                    pod_sandbox_id="pod", port=[HTTP_PORT]))

            assert body_digest(await ws_get(url(), "big")) == (BIG, pod.files["big"])
            replies = await asyncio.gather(*(ws_get(url(), "small") for _ in range(20)))
            assert {body_digest(r) for r in replies} == {(SMALL, pod.files["small"])}
    run(main(), timeout=300)


def test_refused_port_inside_the_namespace(pod: Pod) -> None:
    async def main() -> None:
        async with serving(FakeBackend(netns=pod.netns)) as srv:
            url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="pod"))
            client = await spdy_portforward(url)
            error, data = await spdy_forward_streams(client, 9, 0)
            await data.close()
            err = await error.read_all()
            assert err.startswith(b"error forwarding port 9 to pod pod, uid : cannot connect "
                                  b"to localhost:9 inside network namespace " +
                                  str(pod.netns).encode())
            await client.close()
    run(main())
