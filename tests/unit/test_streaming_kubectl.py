"""Interoperability with the real client: kubectl (client-go, moby/spdystream,
gorilla/websocket) against crib's streaming server, through a stub API server
that relays kubectl's upgrade requests as the real one does. Skipped where
kubectl is not installed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.streamclient.fake_backend import FakeBackend
from tests.streamclient.harness import run, serving
from tests.streamclient.kubeapi import SPDY, WEBSOCKET, FakeApiServer, Kubectl

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")

@asynccontextmanager
async def kubectl_env(tmp: Path, backend: FakeBackend | None = None) -> AsyncIterator[Kubectl]:
    async with serving(backend) as srv:
        api = FakeApiServer(srv)
        await api.start()
        try:
            yield Kubectl(api, tmp)
        finally:
            await api.stop()


@pytest.mark.parametrize("env", [SPDY, WEBSOCKET], ids=["spdy", "websocket"])
def test_kubectl_exec(tmp_path: Path, env: dict[str, str]) -> None:
    async def main() -> None:
        async with kubectl_env(tmp_path) as k:
            assert await k.run("exec", "p1", "--", "echo", "hi", env=env) == (0, b"hi\n", b"")
            code, _, err = await k.run("exec", "p1", "--", "exit", "3", env=env)
            assert (code, err) == (3, b"command terminated with exit code 3\n")
            data = os.urandom(1_000_000)
            assert await k.run("exec", "-i", "p1", "--", "wc", env=env, stdin=data) == (
                0, b"1000000\n", b"")
            code, out, _ = await k.run("exec", "p1", "--", "big", "3000000", env=env)
            assert (code, len(out)) == (0, 3_000_000)
    run(main())


@pytest.mark.skipif(shutil.which("script") is None, reason="script(1) not installed")
@pytest.mark.parametrize("env", [SPDY, WEBSOCKET], ids=["spdy", "websocket"])
def test_kubectl_exec_tty_resize(tmp_path: Path, env: dict[str, str]) -> None:
    async def main() -> None:
        backend = FakeBackend()
        async with kubectl_env(tmp_path, backend) as k:
            line = " ".join(k.argv("exec", "-it", "p1", "--", "stty-size"))
            proc = await asyncio.create_subprocess_exec(
                "script", "-qec", f"stty cols 123 rows 45; {line}", "/dev/null",
                env={**os.environ, **env}, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate(b"")
            assert proc.returncode == 0 and out.rstrip().endswith(b"45 123"), out
            assert backend.calls[0].tty
            assert [(s.width, s.height) for s in backend.calls[0].resizes] == [(123, 45)]
    run(main())


def test_kubectl_port_forward(tmp_path: Path) -> None:
    async def main() -> None:
        payload = os.urandom(5_000_000)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if await r.readline() == b"GET\n":
                w.write(payload)
            else:
                h = hashlib.sha256()
                while data := await r.read(65536):
                    h.update(data)
                w.write(h.hexdigest().encode())
            await w.drain()
            w.close()

        target = await asyncio.start_server(handle, "127.0.0.1", 0)
        tport = target.sockets[0].getsockname()[1]
        async with kubectl_env(tmp_path) as k:
            proc = await asyncio.create_subprocess_exec(
                *k.argv("port-forward", "pod/p1", f":{tport}"), env={**os.environ, **SPDY},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                assert proc.stdout is not None
                line = (await proc.stdout.readline()).decode()
                m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
                assert m and int(m[2]) == tport, line
                lport = int(m[1])

                async def download() -> bytes:
                    r, w = await asyncio.open_connection("127.0.0.1", lport)
                    w.write(b"GET\n")
                    data = await r.read()
                    w.close()
                    return data

                async def upload(data: bytes) -> bytes:
                    r, w = await asyncio.open_connection("127.0.0.1", lport)
                    w.write(b"PUT\n" + data)
                    await w.drain()
                    w.write_eof()          # half-close reaches the pod as EOF
                    reply = await r.read()
                    w.close()
                    return reply

                assert await download() == payload
                assert await upload(payload) == hashlib.sha256(payload).hexdigest().encode()
                chunks = [payload[i * 1000:(i + 1) * 100_000] for i in range(20)]
                replies = await asyncio.gather(*(upload(c) for c in chunks))
                assert replies == [hashlib.sha256(c).hexdigest().encode() for c in chunks]
            finally:
                proc.terminate()
                await proc.wait()
        target.close()
        await target.wait_closed()
    run(main())
