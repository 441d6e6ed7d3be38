"""A threaded reverse proxy on 127.0.0.1 in front of a test registry.

It adds what docker-registry alone cannot give the tests:

- auth: ``AuthMode.BASIC`` (401 + ``WWW-Authenticate: Basic``) or
  ``AuthMode.BEARER`` (401 + a Bearer challenge naming ``/token`` on this proxy;
  only tokens this proxy issued, for a matching repository scope, pass);
- optional blob redirects (like a CDN): blob GETs answer 307 to a signed
  ``/_redirected/...`` URL that needs no auth;
- faults: cut the connection after N bytes of a given blob (``cut_blob``) and
  fail the first K requests with 503 (``fail_first``);
- request records, so tests can assert e.g. that each blob was fetched once.

Bodies are streamed both ways; headers (Docker-Content-Digest, Content-Type,
Range...) pass through; a ``Location`` that points at the upstream registry is
rewritten to point at the proxy.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "host"}
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>blobs|manifests|tags)(/|$)")
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
REDIRECT_PREFIX = "/_redirected"


class AuthMode(Enum):
    NONE = "none"
    BASIC = "basic"
    BEARER = "bearer"


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str  # without the query string
    status: int
    bytes_sent: int = 0


@dataclass
class _Token:
    grants: frozenset[tuple[str, str]]  # (repository, action); action "*" = any
    expires: float


@dataclass
class _Faults:
    cuts: dict[str, tuple[int, int]] = field(default_factory=dict)  # digest -> (bytes, times)
    fail_remaining: int = 0
    fail_status: int = 503
    fail_prefix: str = "/v2/"


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 proxy: AuthProxy) -> None:
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)


class AuthProxy:
    """Start with ``start()`` (or as a context manager); ``url``/``address`` to reach it."""

    def __init__(self, upstream: str, mode: AuthMode = AuthMode.NONE,
                 users: dict[str, str] | None = None, allow_anonymous: bool = False,
                 token_ttl: int = 300, redirect_blobs: bool = False,
                 realm: str = "crib-test", service: str = "crib-test") -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.mode = mode
        self.users = dict(users or {})
        self.allow_anonymous = allow_anonymous
        self.token_ttl = token_ttl
        self.redirect_blobs = redirect_blobs
        self.realm = realm
        self.service = service
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        self._faults = _Faults()
        self._records: list[RequestRecord] = []
        # Requests being served: a record is written after the response, so a
        # client can hold every byte before it exists; readers wait for these.
        self._busy = 0
        self._idle = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------

    def start(self) -> AuthProxy:
        handler = type("BoundHandler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", 0), handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="authproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections, join every handler thread."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        with server.sockets_lock:
            for sock in list(server.open_sockets):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> AuthProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("auth proxy is not running")
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def upstream_url(self) -> str:
        return f"http://{self.upstream[0]}:{self.upstream[1]}"

    # -- faults ----------------------------------------------------------

    def cut_blob(self, digest: str, after_bytes: int, times: int = 1) -> None:
        """The next ``times`` GETs of blob ``digest`` stop after ``after_bytes`` of body."""
        with self._lock:
            self._faults.cuts[digest] = (after_bytes, times)

    def fail_first(self, count: int, status: int = 503, path_prefix: str = "/v2/") -> None:
        """Answer the next ``count`` requests under ``path_prefix`` with ``status``."""
        with self._lock:
            self._faults.fail_remaining = count
            self._faults.fail_status = status
            self._faults.fail_prefix = path_prefix

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            f = self._faults
            if f.fail_remaining > 0 and path.startswith(f.fail_prefix):
                f.fail_remaining -= 1
                return f.fail_status
        return None

    def _take_cut(self, path: str) -> int | None:
        m = _BLOB_PATH.match(path.removeprefix(REDIRECT_PREFIX))
        if not m:
            return None
        with self._lock:
            cut = self._faults.cuts.get(m["digest"])
            if cut is None:
                return None
            after, times = cut
            if times <= 1:
                del self._faults.cuts[m["digest"]]
            else:
                self._faults.cuts[m["digest"]] = (after, times - 1)
            return after

    # -- records ---------------------------------------------------------

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self._records.append(rec)

    def _enter(self) -> None:
        with self._idle:
            self._busy += 1

    def _leave(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    @property
    def records(self) -> list[RequestRecord]:
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=10)
        with self._lock:
            return list(self._records)

    def reset_records(self) -> None:
        with self._lock:
            self._records.clear()

    def count(self, path: str | None = None, method: str | None = None,
              status: int | None = None,
              match: Callable[[RequestRecord], bool] | None = None) -> int:
        return sum(1 for r in self.records
                   if (path is None or r.path == path) and (method is None or r.method == method)
                   and (status is None or r.status == status) and (match is None or match(r)))

    def blob_fetches(self, digest: str) -> int:
        """GETs of blob ``digest`` (any repository, redirected or not) that served data."""
        return self.count(method="GET", match=lambda r: r.path.endswith(f"/blobs/{digest}")
                          and r.status in (200, 206))

    # -- auth ------------------------------------------------------------

    def _basic_user(self, header: str) -> str | None:
        """The user named by a valid ``Basic`` header, else None."""
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, pw = base64.b64decode(header[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        expected = self.users.get(user)
        if expected is not None and hmac.compare_digest(expected, pw):
            return user
        return None

    def issue_token(self, scopes: list[str], user: str | None) -> str:
        grants: set[tuple[str, str]] = set()
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            for action in actions.split(","):
                if user is not None or action == "pull":
                    grants.add((name, action))
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = _Token(frozenset(grants), time.monotonic() + self.token_ttl)
        return token

    def _token_allows(self, header: str, repo: str | None, action: str) -> bool | None:
        """None: no valid token; False: valid but lacking scope; True: allowed."""
        if not header.lower().startswith("bearer "):
            return None
        with self._lock:
            token = self._tokens.get(header[7:].strip())
        if token is None or token.expires < time.monotonic():
            return None
        if repo is None:
            return True
        return (repo, action) in token.grants or (repo, "*") in token.grants

    def _signature(self, path: str) -> str:
        return hmac.new(self._secret, path.encode(), hashlib.sha256).hexdigest()


def _scope_of(method: str, path: str) -> tuple[str | None, str]:
    m = _REPO_PATH.match(path)
    action = {"GET": "pull", "HEAD": "pull", "DELETE": "delete"}.get(method, "push")
    return (m["name"] if m else None), action


class _Handler(BaseHTTPRequestHandler):
    proxy: AuthProxy
    protocol_version = "HTTP/1.1"
    server_version = "crib-authproxy/1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.proxy._enter()
        try:
            self._handle()
        finally:
            self.proxy._leave()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- helpers ---------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _simple(self, path: str, status: int, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> None:
        if self.command in ("POST", "PUT", "PATCH"):
            self._read_body()  # keep the connection usable
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.proxy._record(RequestRecord(self.command, path, status))

    def _unauthorized(self, path: str, challenge: str) -> None:
        self._simple(path, 401, {"errors": [{"code": "UNAUTHORIZED",
                                             "message": "authentication required",
                                             "detail": None}]},
                     {"WWW-Authenticate": challenge})

    # -- dispatch --------------------------------------------------------

    def _handle(self) -> None:
        p = self.proxy
        split = urlsplit(self.path)
        path = split.path
        failure = p._take_failure(path)
        if failure is not None:
            self._simple(path, failure, {"errors": [{"code": "UNAVAILABLE",
                                                     "message": "injected failure"}]})
            return
        if path == "/token" and p.mode is AuthMode.BEARER:
            self._token(path, parse_qs(split.query))
            return
        if path.startswith(REDIRECT_PREFIX + "/"):
            sig = parse_qs(split.query).get("sig", [""])[0]
            inner = path[len(REDIRECT_PREFIX):]
            if self.command not in ("GET", "HEAD") or not hmac.compare_digest(
                    sig, p._signature(inner)):
                self._simple(path, 403, {"errors": [{"code": "DENIED",
                                                     "message": "bad redirect signature"}]})
                return
            self._forward(path, inner)
            return
        if not self._authorized(path):
            return
        if p.redirect_blobs and self.command == "GET" and _BLOB_PATH.match(path):
            location = f"{p.url}{REDIRECT_PREFIX}{path}?sig={p._signature(path)}"
            self.send_response(307)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            p._record(RequestRecord(self.command, path, 307))
            return
        self._forward(path, self.path)

    def _authorized(self, path: str) -> bool:
        p = self.proxy
        header = self.headers.get("Authorization", "")
        if p.mode is AuthMode.BASIC:
            if p._basic_user(header) is None:
                self._unauthorized(path, f'Basic realm="{p.realm}"')
                return False
        elif p.mode is AuthMode.BEARER:
            repo, action = _scope_of(self.command, path)
            allowed = p._token_allows(header, repo, action)
            if not allowed:
                challenge = f'Bearer realm="{p.url}/token",service="{p.service}"'
                if repo is not None:
                    actions = "pull" if action == "pull" else f"pull,{action}"
                    challenge += f',scope="repository:{repo}:{actions}"'
                if allowed is False:
                    challenge += ',error="insufficient_scope"'
                self._unauthorized(path, challenge)
                return False
        return True

    def _token(self, path: str, query: dict[str, list[str]]) -> None:
        p = self.proxy
        header = self.headers.get("Authorization", "")
        user = p._basic_user(header)
        if user is None and (header or not p.allow_anonymous):
            self._unauthorized(path, f'Basic realm="{p.realm}"')
            return
        token = p.issue_token(query.get("scope", []), user)
        self._simple(path, 200, {"token": token, "access_token": token,
                                 "expires_in": p.token_ttl,
                                 "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())})

    # -- forwarding ------------------------------------------------------

    def _forward(self, path: str, target: str) -> None:
        p = self.proxy
        conn = http.client.HTTPConnection(*p.upstream, timeout=60)
        try:
            conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"{p.upstream[0]}:{p.upstream[1]}")
            for key, value in self.headers.items():
                lower = key.lower()
                if lower in HOP_BY_HOP or lower == "content-length":
                    continue
                if lower == "authorization" and p.mode is not AuthMode.NONE:
                    continue
                conn.putheader(key, value)
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            body = self._read_body() if chunked else None
            length = len(body) if body is not None else int(
                self.headers.get("Content-Length") or 0)
            if length or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if body:
                conn.send(body)
            elif length:
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(CHUNK, remaining))
                    if not chunk:
                        raise ConnectionError("client closed the request body early")
                    conn.send(chunk)
                    remaining -= len(chunk)
            resp = conn.getresponse()
            self._relay(path, resp)
        finally:
            conn.close()

    def _relay(self, path: str, resp: http.client.HTTPResponse) -> None:
        p = self.proxy
        self.send_response(resp.status, resp.reason)
        has_length = False
        for key, value in resp.getheaders():
            lower = key.lower()
            if lower in HOP_BY_HOP or lower in ("date", "server"):
                continue
            if lower == "location" and value.startswith(p.upstream_url):
                value = p.url + value[len(p.upstream_url):]
            has_length = has_length or lower == "content-length"
            self.send_header(key, value)
        bodyless = self.command == "HEAD" or resp.status in (204, 304) or resp.status < 200
        if not has_length and not bodyless:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        sent = 0
        cut = p._take_cut(path) if self.command == "GET" and resp.status in (200, 206) else None
        if not bodyless:
            while True:
                want = CHUNK if cut is None else min(CHUNK, cut - sent)
                chunk = resp.read(want) if want > 0 else b""
                if not chunk:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
            if cut is not None:
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
        p._record(RequestRecord(self.command, path, resp.status, sent))
