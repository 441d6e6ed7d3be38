"""crib's streaming server: the URLs that Exec, Attach and PortForward return.

The gRPC handlers call `get_exec_url` / `get_attach_url` /
`get_portforward_url`; each validates the request, stores it under a fresh
single-use token and returns ``http(s)://<address>:<port>/<kind>/<token>``.
The client then connects (GET or POST) and upgrades the connection:

- ``Upgrade: SPDY/3.1`` with ``X-Stream-Protocol-Version`` (client-go's
  default, and the kubelet's), answered 101 with the chosen version echoed;
- ``Upgrade: websocket`` with a channel sub-protocol.

An unknown, used or expired token is 404 (the token is spent as soon as the
request names it, as in the kubelet); a request that is not a valid upgrade
is 400; no common protocol version is 403 (with the versions we accept).

HTTP/1.1 parsing uses h11, which wsproto (the WebSocket framing) depends on
anyway: no extra dependency, and a strict, well-tested parser instead of a
hand-written one; responses are small and written directly. The protocol
work lives in `remotecommand` (exec/attach) and `portforward`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11

from api import api_pb2
from cri.config import StreamingConfig
from cri.errors import InvalidArgument
from cri.streaming import portforward, remotecommand
from cri.streaming.backend import StreamingBackend, StreamIO
from cri.streaming.spdy_session import SessionOptions
from cri.streaming.tokens import Entry, Kind, TokenCache
from cri.streaming.websocket import ChannelWebSocket, WebSocketRejected

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 30.0
_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 500: "Internal Server Error"}


# ------------------------------------------------------------------ validation


def validate_exec(req: api_pb2.ExecRequest) -> None:
    if not req.container_id:
        raise InvalidArgument("missing required container_id")
    if not req.cmd:
        raise InvalidArgument(f"exec in container {req.container_id}: cmd must not be empty")
    if req.tty and req.stderr:
        raise InvalidArgument("tty and stderr cannot both be true (a terminal has one "
                              "output stream)")
    if not (req.stdin or req.stdout or req.stderr):
        raise InvalidArgument("one of stdin, stdout or stderr must be set")


def validate_attach(req: api_pb2.AttachRequest) -> None:
    if not req.container_id:
        raise InvalidArgument("missing required container_id")
    if req.tty and req.stderr:
        raise InvalidArgument("tty and stderr cannot both be true (a terminal has one "
                              "output stream)")
    if not (req.stdin or req.stdout or req.stderr):
        raise InvalidArgument("one of stdin, stdout or stderr must be set")


def validate_port_forward(req: api_pb2.PortForwardRequest) -> None:
    if not req.pod_sandbox_id:
        raise InvalidArgument("missing required pod_sandbox_id")
    for port in req.port:
        if not 0 < port < 65536:
            raise InvalidArgument(f"port {port} is not in 1-65535")


# ------------------------------------------------------------------ HTTP bits


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: bytes
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[bytes, bytes]]

    def values(self, name: str) -> list[str]:
        """All values of a header, comma-separated lists split."""
        key = name.lower().encode()
        out: list[str] = []
        for k, v in self.headers:
            if k == key:
                out.extend(p.strip() for p in v.decode("latin-1").split(",") if p.strip())
        return out


class HttpError(Exception):
    def __init__(self, status: int, message: str,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def _response(status: int, body: str, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    data = (body + "\n").encode("utf-8")
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(data)}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


async def _read_request(reader: asyncio.StreamReader) -> tuple[HttpRequest, bytes] | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise HttpError(400, f"malformed HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await reader.read(64 * 1024)
            if not data:
                return None
            conn.receive_data(data)
            continue
        if not isinstance(event, h11.Request):
            return None
        target = bytes(event.target)
        parts = urlsplit(target.decode("latin-1"))
        req = HttpRequest(event.method.decode("ascii", "replace"), target, parts.path,
                          parse_qs(parts.query), [(bytes(k), bytes(v)) for k, v in event.headers])
        return req, bytes(conn.trailing_data[0])


# ------------------------------------------------------------------ the server


class StreamingServer:
    """The streaming HTTP server. `start()` it; URLs are valid while it runs."""

    def __init__(self, backend: StreamingBackend, address: str = "127.0.0.1",
                 port: int = 10010, tls_cert: str = "", tls_key: str = "",
                 url_ttl: float = 60.0, *, stream_creation_timeout: float = 30.0,
                 session_options: SessionOptions | None = None) -> None:
        self.backend = backend
        self.address = address
        self.port = port
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.creation_timeout = stream_creation_timeout
        self.session_options = session_options
        self.tokens = TokenCache(url_ttl)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(cls, cfg: StreamingConfig, backend: StreamingBackend) -> StreamingServer:
        return cls(backend, cfg.address, cfg.port, cfg.tls_cert, cfg.tls_key, cfg.url_ttl)

    # ---- lifecycle

    async def start(self) -> None:
        context = None
        if self.tls_cert or self.tls_key:
            if not (self.tls_cert and self.tls_key):
                raise InvalidArgument("streaming TLS needs both tls_cert and tls_key")
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.tls_cert, self.tls_key)
        self._server = await asyncio.start_server(self._accept, self.address, self.port,
                                                  ssl=context, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("streaming server listening on %s", self.base_url)

    async def stop(self) -> None:
        """Stop listening and end every open session (their commands are cancelled)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{scheme}://{host}:{self.port}"

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    # ---- URLs (called from the gRPC handlers)

    def get_exec_url(self, req: api_pb2.ExecRequest) -> str:
        validate_exec(req)
        return f"{self.base_url}/{Kind.EXEC}/{self.tokens.insert(Kind.EXEC, req)}"

    def get_attach_url(self, req: api_pb2.AttachRequest) -> str:
        validate_attach(req)
        return f"{self.base_url}/{Kind.ATTACH}/{self.tokens.insert(Kind.ATTACH, req)}"

    def get_portforward_url(self, req: api_pb2.PortForwardRequest) -> str:
        validate_port_forward(req)
        token = self.tokens.insert(Kind.PORT_FORWARD, req)
        return f"{self.base_url}/{Kind.PORT_FORWARD}/{token}"

    # ---- connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as exc:
            log.debug("streaming connection ended: %s", exc)
        except Exception:
            log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            got = await asyncio.wait_for(_read_request(reader), HEADER_TIMEOUT)
            if got is None:
                return
            request, leftover = got
            entry = self._route(request)
            await self._upgrade(entry, request, leftover, reader, writer)
        except TimeoutError:
            return
        except HttpError as exc:
            log.debug("streaming request refused (%d): %s", exc.status, exc)
            writer.write(_response(exc.status, str(exc), exc.headers))
            await writer.drain()

    def _route(self, request: HttpRequest) -> Entry:
        segments = request.path.strip("/").split("/")
        kinds = {k.value: k for k in Kind}
        if len(segments) != 2 or segments[0] not in kinds:
            raise HttpError(404, "404 page not found")
        if request.method not in ("GET", "POST"):
            raise HttpError(405, f"method {request.method} not allowed")
        entry = self.tokens.consume(segments[1])
        if entry is None or entry.kind is not kinds[segments[0]]:
            raise HttpError(404, "404 page not found")
        return entry

    async def _upgrade(self, entry: Entry, request: HttpRequest, leftover: bytes,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upgrade = " ".join(request.values("upgrade")).lower()
        connection = " ".join(request.values("connection")).lower()
        if "upgrade" not in connection or not upgrade:
            raise HttpError(400, "unable to upgrade: missing upgrade headers in request")
        if upgrade == "websocket":
            await self._websocket(entry, request, leftover, reader, writer)
        elif "spdy/3.1" in upgrade:
            await self._spdy(entry, request, leftover, reader, writer)
        else:
            raise HttpError(400, f"unable to upgrade: unsupported protocol {upgrade!r}")

    async def _spdy(self, entry: Entry, request: HttpRequest, leftover: bytes,
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        supported = (portforward.SPDY_PROTOCOLS if entry.kind is Kind.PORT_FORWARD
                     else remotecommand.SPDY_PROTOCOLS)
        offered = request.values("X-Stream-Protocol-Version")
        if not offered:
            raise HttpError(400, "unable to upgrade: X-Stream-Protocol-Version is required")
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            raise HttpError(
                403, f"unable to upgrade: unable to negotiate protocol: client supports "
                     f"{remotecommand.go_list(offered)}, server accepts "
                     f"{remotecommand.go_list(supported)}",
                [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                      f"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {chosen}\r\n\r\n")
                     .encode("latin-1"))
        req = entry.request
        if isinstance(req, api_pb2.PortForwardRequest):
            await portforward.serve_spdy(reader, writer, leftover, self._dialer(req),
                                         f"pod {req.pod_sandbox_id}, uid ",
                                         self.creation_timeout, self.session_options)
            return
        opts, action, on_result, on_error = self._command(req)
        await remotecommand.serve_spdy(reader, writer, leftover, chosen, opts, action,
                                       on_result, on_error, self.creation_timeout,
                                       self.session_options)

    async def _websocket(self, entry: Entry, request: HttpRequest, leftover: bytes,
                         reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = entry.request
        supported = (portforward.WEBSOCKET_PROTOCOLS if entry.kind is Kind.PORT_FORWARD
                     else remotecommand.WEBSOCKET_PROTOCOLS)
        ports: list[int] = []
        if isinstance(req, api_pb2.PortForwardRequest):
            ports = list(req.port) or _query_ports(request.query)
        try:
            ws = ChannelWebSocket.accept(reader, writer, request.headers, request.target,
                                         supported, leftover)
        except WebSocketRejected as exc:
            raise HttpError(exc.status, str(exc)) from None
        if isinstance(req, api_pb2.PortForwardRequest):
            await portforward.serve_websocket(ws, ports, self._dialer(req),
                                              f"pod {req.pod_sandbox_id}, uid ")
            return
        opts, action, on_result, on_error = self._command(req)
        await remotecommand.serve_websocket(ws, opts, action, on_result, on_error)

    # ---- binding requests to the backend

    def _command(self, req: api_pb2.ExecRequest | api_pb2.AttachRequest) -> tuple[
            remotecommand.StreamOptions, remotecommand.Action,
            remotecommand.OnResult, remotecommand.OnError]:
        opts = remotecommand.StreamOptions(req.stdin, req.stdout, req.stderr, req.tty)
        backend, cid = self.backend, req.container_id
        if isinstance(req, api_pb2.ExecRequest):
            cmd = list(req.cmd)
            log.info("exec in container %s: %s", cid, cmd)

            async def run_exec(io: StreamIO) -> int | None:
                return await backend.exec(cid, cmd, io)

            return (opts, run_exec, lambda code: remotecommand.exit_status(code or 0, cmd),
                    lambda err: f"error executing command in container: {err}")
        log.info("attach to container %s", cid)

        async def run_attach(io: StreamIO) -> int | None:
            await backend.attach(cid, io)
            return None

        return (opts, run_attach, lambda _: remotecommand.SUCCESS,
                lambda err: f"error attaching to container: {err}")

    def _dialer(self, req: api_pb2.PortForwardRequest) -> portforward.Dialer:
        backend, pod = self.backend, req.pod_sandbox_id
        resolved: list[Path | None] = []  # the target, asked for once per session

        async def dial(port: int) -> portforward.Connection:
            if not resolved:
                resolved.append(await backend.port_forward_target(pod))
            return await portforward.dial_in_netns(resolved[0], port)

        return dial


def _query_ports(query: dict[str, list[str]]) -> list[int]:
    ports = []
    for value in query.get("port", []):
        for part in value.split(","):
            if not part.isdigit() or not 0 < int(part) < 65536:
                raise HttpError(400, f"unable to parse {part!r} as a port")
            ports.append(int(part))
    if not ports:
        raise HttpError(400, 'query parameter "port" is required')
    return ports
