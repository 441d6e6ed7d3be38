"""crib's own Prometheus metrics and the HTTP endpoint that serves them.

Off by default. `enable()` builds every metric on a private registry (never
prometheus_client's global one; see cri/metrics_instruments.py, the only module
that imports prometheus_client, loaded by `enable()`); until then `ENABLED` is False and the
recording functions return at once, so callers on a hot path guard with
``if metrics.ENABLED:`` and pay nothing when metrics are off.

What is exported (all prefixed ``crib_`` except the standard ``process_*``):

- ``crib_grpc_requests_total{method,code}`` and
  ``crib_grpc_request_duration_seconds{method}``: every CRI call, recorded by
  the error boundary;
- ``crib_image_pull_bytes_total``, ``crib_image_pull_duration_seconds`` (successful
  pulls only) and ``crib_image_pulls_total{result}``;
- ``crib_operation_failures_total{operation,step}``: which step of which
  operation failed (step: cni, oci_runtime, mount, cgroup, ...);
- ``crib_containers{state}`` and ``crib_sandboxes{state}``: read at scrape time
  from callbacks the runtime registers, so nothing is counted on the hot path;
- ``process_*``: CPU, memory, open fds and start time of the daemon.

The endpoint is a tiny asyncio HTTP/1.1 server (one request per connection)
answering ``GET /metrics``: the exposition runs on the event loop, which is
what lets the state callbacks read the runtime's in-memory stores safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from cri.errors import InvalidArgument

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from cri.metrics_instruments import Instruments

log = logging.getLogger(__name__)

# Checked by callers before recording anything: metrics cost nothing while off.
ENABLED: bool = False

# 100µs .. 60s: a cached ListContainers up to a slow image pull or a stop timeout.
RPC_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                      0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PULL_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

STATE_KINDS: Final = ("containers", "sandboxes")
StateSource = Callable[[], dict[str, int]]

# Survive enable()/disable(): the runtime may register before metrics are enabled.
# Read by cri.metrics_instruments at scrape time.
_state_sources: dict[str, StateSource] = {}

_current: Instruments | None = None


def enable() -> CollectorRegistry:
    """Create the metrics (once) and start recording; returns the private registry."""
    global ENABLED, _current
    if _current is None:
        # Imported here, not at the top: prometheus_client is ~100 modules and a few
        # MiB of RSS that a daemon with metrics off (the default) never needs.
        from cri.metrics_instruments import Instruments

        _current = Instruments(_state_sources)
    ENABLED = True
    return _current.registry


def disable() -> None:
    """Stop recording and forget every value (for shutdown and tests)."""
    global ENABLED, _current
    ENABLED = False
    _current = None


def registry() -> CollectorRegistry | None:
    """The private registry, or None while metrics are disabled."""
    return _current.registry if _current is not None else None


def observe_rpc(method: str, code_name: str, seconds: float) -> None:
    """One finished CRI call: its gRPC status code name ("OK", "NOT_FOUND"...) and duration."""
    m = _current
    if m is None:
        return
    m.rpc_requests.labels(method, code_name).inc()
    m.rpc_duration.labels(method).observe(seconds)


def record_pull(nbytes: int, seconds: float, ok: bool) -> None:
    """One finished pull: bytes fetched from the registry (even if it then failed)."""
    m = _current
    if m is None:
        return
    if nbytes > 0:
        m.pull_bytes.inc(nbytes)
    if ok:
        m.pull_duration.observe(seconds)
    m.pulls.labels("success" if ok else "failure").inc()


def record_failure(operation: str, step: str) -> None:
    """A failed operation (e.g. "RunPodSandbox") at a step ("cni", "oci_runtime", "mount", ...).

    Both values become label values: pass constants, never ids or messages.
    """
    m = _current
    if m is None:
        return
    m.failures.labels(operation, step).inc()


def register_state_source(kind: str, fn: StateSource) -> None:
    """Have `fn` report the number of `kind` ("containers" or "sandboxes") by state.

    `fn` is called on the event loop at every scrape; it must be quick and must
    not block. Registering again replaces the previous source.
    """
    if kind not in STATE_KINDS:
        raise InvalidArgument(f"unknown metrics state kind {kind!r}: expected one of "
                              f"{', '.join(STATE_KINDS)}")
    _state_sources[kind] = fn


def unregister_state_source(kind: str) -> None:
    _state_sources.pop(kind, None)


def exposition(accept: str = "", accept_encoding: str = "") -> tuple[bytes, dict[str, str]]:
    """The current metrics in the format the client accepts, and the response headers."""
    m = _current
    if m is None:
        return b"", {"Content-Type": "text/plain; charset=utf-8"}
    body, content_type = m.render(accept)
    headers = {"Content-Type": content_type}
    if "gzip" in accept_encoding:
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return body, headers


# ------------------------------------------------------------------ HTTP endpoint

_MAX_HEADER_LINES = 100
_READ_TIMEOUT = 10.0  # a client that sends no complete request in time is dropped


def parse_address(address: str) -> tuple[str, int]:
    """Split "host:port" ("[::1]:9537", ":9537" = all interfaces) into host and port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidArgument(f"invalid metrics address {address!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


class MetricsServer:
    """The running /metrics endpoint; `stop()` closes the port and every open connection."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        self._clients: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else 0

    @property
    def host(self) -> str:
        sockets = self._server.sockets
        return str(sockets[0].getsockname()[0]) if sockets else ""

    async def stop(self) -> None:
        self._server.close()
        for writer in list(self._clients):
            writer.close()
        await self._server.wait_closed()
        for writer in list(self._clients):
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            try:
                async with asyncio.timeout(_READ_TIMEOUT):
                    method, path, headers = await _read_request(reader)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ConnectionError):
                await _respond(writer, 400, b"bad request\n", {})
                return
            if method not in ("GET", "HEAD"):
                await _respond(writer, 405, b"method not allowed\n", {"Allow": "GET, HEAD"})
                return
            if path.split("?", 1)[0] != "/metrics":
                await _respond(writer, 404, b"not found: try /metrics\n", {})
                return
            try:
                body, extra = exposition(headers.get("accept", ""),
                                         headers.get("accept-encoding", ""))
            except Exception:
                log.exception("metrics exposition failed")
                await _respond(writer, 500, b"metrics exposition failed\n", {})
                return
            await _respond(writer, 200, body, extra, head=method == "HEAD")
        except ConnectionError:
            pass
        finally:
            self._clients.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"malformed request line {line[:80]!r}")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        raw = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        if not raw:
            return parts[0], parts[1], headers
        name, _, value = raw.partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many header lines")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                   headers: dict[str, str], head: bool = False) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}",
             f"Content-Length: {len(body)}", "Connection: close"]
    headers.setdefault("Content-Type", "text/plain; charset=utf-8")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(body)
    await writer.drain()


async def start_server(address: str) -> MetricsServer:
    """Serve /metrics on `address` ("host:port"; port 0 picks a free one).

    Enables metrics if they are not yet. Raises OSError when the address
    cannot be bound.
    """
    host, port = parse_address(address)
    enable()
    handle: MetricsServer | None = None

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert handle is not None
        await handle._handle(reader, writer)

    server = await asyncio.start_server(on_client, host or None, port, limit=16384,
                                        reuse_address=True)
    handle = MetricsServer(server)
    log.info("serving Prometheus metrics on http://%s:%d/metrics", handle.host, handle.port)
    return handle
