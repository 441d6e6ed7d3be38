"""kubectl itself (client-go: moby/spdystream and gorilla/websocket) against a
real daemon: a stub API server relays kubectl's exec, attach and port-forward
upgrades to URLs from the daemon's own Exec/Attach/PortForward RPCs, as the
API server and the kubelet would. Skipped where kubectl is not installed."""

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

from api import api_pb2
from tests.integration.conftest import SeededRegistry
from tests.integration.cridaemon import CtrCrib, ctr_crib, remove, wait_state
from tests.integration.streamdaemon import (
    BIG,
    HTTP_PORT,
    SMALL,
    DaemonUrls,
    Pod,
    baseline,
    httpd,
    new_pod,
    run,
    www,
)
from tests.streamclient.kubeapi import SPDY, WEBSOCKET, FakeApiServer, Kubectl

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("kubectl") is None,
                                 reason="kubectl not installed")]
__all__ = ["ctr_crib"]


@asynccontextmanager
async def kubectl(pod: Pod, cid: str, tmp: Path) -> AsyncIterator[Kubectl]:
    api = FakeApiServer(DaemonUrls(pod.d), sandbox_id=pod.sid, container_id=cid)
    await api.start()
    try:
        yield Kubectl(api, tmp)
    finally:
        await api.stop()


@pytest.mark.parametrize("env", [SPDY, WEBSOCKET], ids=["spdy", "websocket"])
def test_kubectl_exec_and_attach(ctr_crib: CtrCrib, test_registry: SeededRegistry,
                                 tmp_path: Path, env: dict[str, str]) -> None:
    pod = new_pod(ctr_crib, test_registry)
    cid = pod.run("sleeper", ["sleep", "1000"])
    shell = pod.run("shell", ["sh"], stdin=True, stdin_once=True)
    base = baseline(pod.d, cid)

    async def scenario() -> None:
        async with kubectl(pod, cid, tmp_path) as k:
            assert await k.run("exec", "p1", "--", "echo", "hi", env=env) == (0, b"hi\n", b"")
            code, _, err = await k.run("exec", "p1", "--", "sh", "-c", "exit 3", env=env)
            assert (code, err) == (3, b"command terminated with exit code 3\n")
            data = os.urandom(3_000_000)
            code, out, _ = await k.run("exec", "-i", "p1", "--", "sha256sum", env=env,
                                       stdin=data)
            assert code == 0 and out.split()[0].decode() == hashlib.sha256(data).hexdigest()
        async with kubectl(pod, shell, tmp_path) as k:
            code, out, _ = await k.run("attach", "-i", "p1", env=env,
                                       stdin=b"echo attached $((6 * 7))\n")
            assert code == 0 and out == b"attached 42\n", out

    run(scenario())
    wait_state(pod.d, shell, api_pb2.ContainerState.CONTAINER_EXITED)  # stdin_once
    base.check()
    remove(pod.d, shell)
    remove(pod.d, cid)


def test_kubectl_port_forward(ctr_crib: CtrCrib, test_registry: SeededRegistry,
                              tmp_path: Path) -> None:
    pod = new_pod(ctr_crib, test_registry)
    root, digests = www(tmp_path)
    cid = httpd(pod, root, str(HTTP_PORT))
    base = baseline(pod.d, cid)

    async def get(port: int, path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /{path} HTTP/1.0\r\nHost: pod\r\n\r\n".encode())
        response = await reader.read(-1)
        writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head[:200]
        return len(body), hashlib.sha256(body).hexdigest()

    async def scenario() -> None:
        async with kubectl(pod, cid, tmp_path) as k:
            proc = await asyncio.create_subprocess_exec(
                *k.argv("port-forward", "pod/p1", f":{HTTP_PORT}"),
                env={**os.environ, **SPDY},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                assert proc.stdout is not None
                line = (await proc.stdout.readline()).decode()
                m = re.match(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
                assert m and int(m[2]) == HTTP_PORT, line
                local = int(m[1])
                assert await get(local, "big") == (BIG, digests["big"])
                replies = await asyncio.gather(*(get(local, "small") for _ in range(20)))
                assert set(replies) == {(SMALL, digests["small"])}
            finally:
                proc.terminate()
                await proc.wait()

    run(scenario())
    base.check()
    remove(pod.d, cid)
