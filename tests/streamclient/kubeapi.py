"""Just enough of a Kubernetes API server for `kubectl exec/attach/port-forward`.

kubectl fetches the pod, then sends its upgrade request to the pod's
exec/attach/portforward subresource; the real API server proxies that request
to the kubelet, which (through the CRI) answers it from the runtime's
streaming server. Here the request is relayed byte for byte to a fresh URL of
crib's streaming server, so kubectl's own client-go code (SPDY via
moby/spdystream, or WebSocket) talks to crib unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from api import api_pb2


class UrlSource(Protocol):
    """Where streaming URLs come from: crib's StreamingServer, or a daemon's RPCs."""

    def get_exec_url(self, req: api_pb2.ExecRequest) -> str: ...

    def get_attach_url(self, req: api_pb2.AttachRequest) -> str: ...

    def get_portforward_url(self, req: api_pb2.PortForwardRequest) -> str: ...


def _pod(namespace: str, name: str) -> bytes:
    return json.dumps({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": namespace, "uid": "u1"},
        "spec": {"containers": [{"name": "c1", "image": "busybox"}]},
        "status": {"phase": "Running"},
    }).encode()


_DISCOVERY = {
    "/api": {"kind": "APIVersions", "versions": ["v1"],
             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                             "serverAddress": "127.0.0.1"}]},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": []},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["get", "list"], "shortNames": ["po"]},
        *({"name": f"pods/{sub}", "singularName": "", "namespaced": True,
           "kind": kind, "verbs": ["create", "get"]}
          for sub, kind in (("exec", "PodExecOptions"), ("attach", "PodAttachOptions"),
                            ("portforward", "PodPortForwardOptions")))]},
}


def _json_response(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class FakeApiServer:
    def __init__(self, streaming: UrlSource, sandbox_id: str = "pod1",
                 container_id: str = "c1") -> None:
        self.streaming = streaming
        self.sandbox_id = sandbox_id
        self.container_id = container_id
        self.port = 0
        self.requests: list[str] = []
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
            "users": [{"name": "u", "user": {}}],
        }))
        return path

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = line.split(" ", 2)
            self.requests.append(f"{method} {target}")
            parts = urlsplit(target)
            query = parse_qs(parts.query)
            segs = parts.path.strip("/").split("/")
            if parts.path.rstrip("/") in _DISCOVERY:
                writer.write(_json_response(json.dumps(_DISCOVERY[parts.path.rstrip("/")])
                                            .encode()))
                await writer.drain()
                return
            if len(segs) == 6 and segs[:2] == ["api", "v1"] and segs[4] == "pods":
                ns, name = segs[3], segs[5]
                writer.write(_json_response(_pod(ns, name)))
                await writer.drain()
                return
            if len(segs) == 7 and segs[4] == "pods" and segs[6] in (
                    "exec", "attach", "portforward"):
                url = self._stream_url(segs[6], query)
                await self._relay(url, method, header_lines, reader, writer)
                return
            writer.write(_json_response(
                b'{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}',
                "404 Not Found"))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # (a cancelled handler must not re-raise: asyncio would log it)
        finally:
            self._tasks.discard(task)
            writer.close()

    def _stream_url(self, kind: str, q: dict[str, list[str]]) -> str:
        def flag(name: str) -> bool:
            return q.get(name, ["false"])[0] in ("true", "1")

        if kind == "exec":
            return self.streaming.get_exec_url(api_pb2.ExecRequest(
                container_id=self.container_id, cmd=q.get("command", []), tty=flag("tty"),
                stdin=flag("stdin"), stdout=flag("stdout"), stderr=flag("stderr")))
        if kind == "attach":
            return self.streaming.get_attach_url(api_pb2.AttachRequest(
                container_id=self.container_id, tty=flag("tty"), stdin=flag("stdin"),
                stdout=flag("stdout"), stderr=flag("stderr")))
        ports = [int(p) for v in q.get("ports", []) for p in v.split(",")]
        return self.streaming.get_portforward_url(api_pb2.PortForwardRequest(
            pod_sandbox_id=self.sandbox_id, port=ports))

    async def _relay(self, url: str, method: str, header_lines: list[str],
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parts = urlsplit(url)
        up_reader, up_writer = await asyncio.open_connection(parts.hostname, parts.port)
        headers = [h for h in header_lines if h and not h.lower().startswith("host:")]
        up_writer.write((f"{method} {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         + "".join(h + "\r\n" for h in headers) + "\r\n").encode("latin-1"))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            up_writer.close()


# ---------------------------------------------------------------- kubectl


SPDY = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false", "KUBECTL_PORT_FORWARD_WEBSOCKETS": "false"}
WEBSOCKET = {"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "true"}


class Kubectl:
    def __init__(self, api: FakeApiServer, tmp: Path) -> None:
        self.config = api.kubeconfig(tmp)
        self.cache = tmp / "kube-cache"   # never ~/.kube

    def argv(self, *args: str) -> list[str]:
        return ["kubectl", "--kubeconfig", str(self.config), "--cache-dir", str(self.cache),
                *args]

    async def run(self, *args: str, env: dict[str, str],
                  stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args), env={**os.environ, **env},
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(stdin)
        assert proc.returncode is not None
        return proc.returncode, out, err
