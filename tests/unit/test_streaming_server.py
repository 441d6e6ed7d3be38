"""The streaming server's HTTP side: URLs and their tokens, validation, and
the answers to requests that cannot be upgraded."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import InvalidArgument, ResourceExhausted
from cri.streaming.server import StreamingServer
from cri.streaming.tokens import Kind, TokenCache
from tests.streamclient.commands import SpdyCommand, spdy_exec, spdy_headers
from tests.streamclient.fake_backend import FakeBackend
from tests.streamclient.harness import exec_request, run, serving
from tests.streamclient.http_upgrade import upgrade
from tests.streamclient.ws_client import HandshakeFailed, WsClient


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_urls_are_unguessable_and_bound_to_their_kind() -> None:
    srv = StreamingServer(FakeBackend(), "127.0.0.1", 10010)
    a = srv.get_exec_url(exec_request(["ls"]))
    b = srv.get_exec_url(exec_request(["ls"]))
    assert a.startswith("http://127.0.0.1:10010/exec/") and a != b
    assert len(a.rsplit("/", 1)[1]) >= 32
    assert "/attach/" in srv.get_attach_url(api_pb2.AttachRequest(container_id="c", stdout=True))
    url = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p", port=[80]))
    assert "/portforward/" in url
    v6 = StreamingServer(FakeBackend(), "::1", 1, tls_cert="c", tls_key="k")
    assert v6.base_url == "https://[::1]:1"


@pytest.mark.parametrize(("req", "words"), [
    (api_pb2.ExecRequest(cmd=["ls"], stdout=True), "container_id"),
    (api_pb2.ExecRequest(container_id="c", stdout=True), "cmd must not be empty"),
    (api_pb2.ExecRequest(container_id="c", cmd=["ls"], tty=True, stdout=True, stderr=True),
     "tty and stderr"),
    (api_pb2.ExecRequest(container_id="c", cmd=["ls"]), "one of stdin, stdout or stderr"),
    (api_pb2.AttachRequest(container_id="c", tty=True, stderr=True), "tty and stderr"),
    (api_pb2.AttachRequest(container_id="c"), "one of stdin, stdout or stderr"),
    (api_pb2.AttachRequest(stdout=True), "container_id"),
    (api_pb2.PortForwardRequest(port=[80]), "pod_sandbox_id"),
    (api_pb2.PortForwardRequest(pod_sandbox_id="p", port=[70000]), "port 70000"),
])
def test_invalid_requests(req: object, words: str) -> None:
    srv = StreamingServer(FakeBackend())
    get = {api_pb2.ExecRequest: srv.get_exec_url, api_pb2.AttachRequest: srv.get_attach_url,
           api_pb2.PortForwardRequest: srv.get_portforward_url}[type(req)]
    with pytest.raises(InvalidArgument, match=words):
        get(req)  # type: ignore[operator]


def test_token_cache_single_use_expiry_and_bound() -> None:
    clock = Clock()
    cache = TokenCache(ttl=10, max_entries=3, clock=clock)
    req = exec_request(["ls"])
    t1 = cache.insert(Kind.EXEC, req)
    req.cmd.append("changed")          # the cache keeps its own copy
    entry = cache.consume(t1)
    assert entry is not None and list(entry.request.cmd) == ["ls"]  # type: ignore[union-attr]
    assert cache.consume(t1) is None    # single use
    t2 = cache.insert(Kind.EXEC, req)
    clock.now += 10
    assert cache.consume(t2) is None    # expired
    for _ in range(3):
        cache.insert(Kind.EXEC, req)
    with pytest.raises(ResourceExhausted):
        cache.insert(Kind.EXEC, req)
    clock.now += 11                     # expired entries make room again
    cache.insert(Kind.EXEC, req)
    assert len(cache) == 1


async def status_of(url: str, headers: list[tuple[str, str]], method: str = "POST") -> tuple[
        int, bytes, dict[str, list[str]]]:
    up = await upgrade(url, headers, method=method)
    if up.status == 101:
        up.writer.close()
    return up.status, up.body, up.headers


def test_unknown_used_and_expired_tokens_are_404() -> None:
    async def main() -> None:
        async with serving() as srv:
            clock = Clock()
            srv.tokens = TokenCache(5, clock=clock)
            url = srv.get_exec_url(exec_request(["echo", "once"]))
            r = await spdy_exec(url)
            assert r.stdout == b"once\n"
            assert (await status_of(url, spdy_headers(["v4.channel.k8s.io"])))[0] == 404
            assert (await status_of(url.rsplit("/", 1)[0] + "/nope",
                                    spdy_headers(["v4.channel.k8s.io"])))[0] == 404
            url = srv.get_exec_url(exec_request(["echo", "late"]))
            clock.now += 5
            assert (await status_of(url, spdy_headers(["v4.channel.k8s.io"])))[0] == 404
            # a token of one kind is no good on another endpoint (and is spent)
            url = srv.get_exec_url(exec_request(["echo", "x"]))
            assert (await status_of(url.replace("/exec/", "/attach/"),
                                    spdy_headers(["v4.channel.k8s.io"])))[0] == 404
            assert (await status_of(url, spdy_headers(["v4.channel.k8s.io"])))[0] == 404
            assert (await status_of(srv.base_url + "/other", []))[0] == 404
    run(main())


def test_bad_upgrades() -> None:
    async def main() -> None:
        async with serving() as srv:
            def url() -> str:
                return srv.get_exec_url(exec_request(["echo", "x"]))

            status, body, _ = await status_of(url(), [])
            assert (status, body) == (400, b"unable to upgrade: missing upgrade headers in "
                                           b"request\n")
            status, _, _ = await status_of(url(), [("Connection", "Upgrade"),
                                                   ("Upgrade", "h2c")])
            assert status == 400
            status, body, _ = await status_of(url(), [("Connection", "Upgrade"),
                                                      ("Upgrade", "SPDY/3.1")])
            assert (status, body) == (400, b"unable to upgrade: X-Stream-Protocol-Version is "
                                           b"required\n")
            status, body, headers = await status_of(url(), spdy_headers(["v9.channel.k8s.io"]))
            assert status == 403 and b"unable to negotiate protocol" in body
            assert headers["x-accepted-stream-protocol-versions"] == [
                "v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                "v2.channel.k8s.io", "channel.k8s.io"]
            status, _, _ = await status_of(url(), spdy_headers(["v4.channel.k8s.io"]),
                                           method="PUT")
            assert status == 405
            with pytest.raises(HandshakeFailed) as info:
                await WsClient.connect(url(), ["v6.channel.k8s.io"])
            assert info.value.response.status == 403
            status, _, _ = await status_of(url(), [("Connection", "Upgrade"),
                                                   ("Upgrade", "websocket")])
            assert status == 400   # no Sec-WebSocket-Key
            pf = srv.get_portforward_url(api_pb2.PortForwardRequest(pod_sandbox_id="p"))
            status, _, _ = await status_of(pf, spdy_headers(["v4.channel.k8s.io"]))
            assert status == 403   # port-forward speaks portforward.k8s.io
            # not HTTP at all
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"\x16\x03\x01garbage\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            writer.close()
    run(main())


def test_get_and_post_both_upgrade() -> None:
    async def main() -> None:
        async with serving() as srv:
            for method in ("GET", "POST"):
                url = srv.get_exec_url(exec_request(["echo", "x"]))
                status, _, headers = await status_of(url, spdy_headers(
                    ["v4.channel.k8s.io", "v3.channel.k8s.io"]), method=method)
                assert status == 101
                assert headers["x-stream-protocol-version"] == ["v4.channel.k8s.io"]
                assert headers["upgrade"] == ["SPDY/3.1"]
    run(main())


def test_stop_ends_open_sessions() -> None:
    async def main() -> None:
        backend = FakeBackend()
        srv = StreamingServer(backend, "127.0.0.1", 0)
        await srv.start()
        url = srv.get_exec_url(exec_request(["sleep"]))
        cmd = await SpdyCommand.open(url)
        await backend.started.wait()
        await srv.stop()
        assert backend.calls[0].cancelled and srv.active_connections == 0
        await cmd.client.close()
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)

    async def main() -> None:
        srv = StreamingServer(FakeBackend(), "127.0.0.1", 0, str(cert), str(key))
        await srv.start()
        try:
            url = srv.get_exec_url(exec_request(["echo", "secure"]))
            assert url.startswith("https://127.0.0.1:")
            ctx = ssl.create_default_context(cafile=str(cert))
            cmd = await SpdyCommand.open(url, ssl=ctx)
            r = await cmd.collect()
            assert (r.stdout, r.exit_code) == (b"secure\n", 0)
        finally:
            await srv.stop()
    run(main())
