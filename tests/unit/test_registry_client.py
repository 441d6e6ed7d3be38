"""The registry client against a small distribution-API server on 127.0.0.1.

The fake server speaks plain HTTP/1.1 with keep-alive; like Go's net/http it
answers a TLS ClientHello with a plain 400, so the client's HTTPS attempt on an
insecure registry fails fast and it falls back to HTTP.  Behaviours are
switched per test (auth mode, injected failures, drops, stalls, redirects).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from cri.errors import Cancelled, NotFound
from imageservice.auth import Credentials
from imageservice.manifest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from imageservice.platform import Platform, PlatformNotFound, host_platform
from imageservice.reference import parse_reference
from imageservice.registries import PullSource
from imageservice.registry import (
    DigestMismatch,
    ManifestUnsupported,
    RegistryClient,
    RegistryDenied,
    RegistryUnauthorized,
    RegistryUnavailable,
)

REPO = "library/app"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Image:
    manifest: bytes
    manifest_digest: str
    config: bytes
    layers: list[bytes]

    @property
    def layer_digests(self) -> list[str]:
        return [digest(layer) for layer in self.layers]


@dataclass
class FakeRegistry:
    auth: str = "none"  # none | basic | bearer
    users: dict[str, str] = field(default_factory=lambda: {"alice": "wonderland"})
    token_needs_user: bool = False
    token_post_supported: bool = True
    static_token: str = "static-token"
    supports_range: bool = True
    bad_header_digest: bool = False
    forbidden: bool = False
    redirect_blobs_to: str = ""
    blobs: dict[str, bytes] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)
    fail: dict[str, list[int]] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    stall_after: dict[str, int] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    token_requests: list[Seen] = field(default_factory=list)
    issued: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.handler_threads: list[threading.Thread] = []
        registry = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: Any, client_address: Any) -> None:
                thread = threading.Thread(
                    target=self.process_request_thread, args=(request, client_address), daemon=True
                )
                registry.handler_threads.append(thread)
                thread.start()

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients hanging up mid-response are part of the tests

        self.server = Server(("127.0.0.1", 0), _Handler)
        self.server.registry = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    @property
    def base(self) -> str:
        return f"http://{self.host}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        for thread in self.handler_threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in self.handler_threads), "handler threads left"

    def add_blob(self, data: bytes) -> str:
        self.blobs[digest(data)] = data
        return digest(data)

    def add_manifest(self, repo: str, tag: str | None, media_type: str, body: bytes) -> str:
        self.manifests[(repo, digest(body))] = (media_type, body)
        if tag:
            self.manifests[(repo, tag)] = (media_type, body)
        return digest(body)

    def add_image(self, repo: str = REPO, tag: str | None = "v1", size: int = 300_000) -> Image:
        layers = [os.urandom(size), os.urandom(1000)]
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
        config_bytes = config.encode()
        self.add_blob(config_bytes)
        for layer in layers:
            self.add_blob(layer)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(CONFIG_TYPE, config_bytes),
            "layers": [descriptor(LAYER_TYPE, layer) for layer in layers],
        }
        body = json.dumps(manifest).encode()
        return Image(body, self.add_manifest(repo, tag, OCI_MANIFEST, body), config_bytes, layers)

    def count(self, path: str) -> int:
        return sum(1 for s in self.seen if s.path == path)


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest(data), "size": len(data), **extra}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def handle(self) -> None:
        try:
            first = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first == b"\x16":  # a TLS ClientHello: answer like Go's HTTP server does
            self.connection.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\nplain HTTP server\n")
            return
        super().handle()

    @property
    def reg(self) -> FakeRegistry:
        return self.server.registry

    def send_body(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error_json(
        self, status: int, code: str, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
        self.send_body(status, body, {"Content-Type": "application/json", **(headers or {})})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        path = urlsplit(self.path).path
        seen = Seen("POST", path, dict(self.headers), body)
        with self.reg.lock:
            self.reg.seen.append(seen)
        if path != "/token" or not self.reg.token_post_supported:
            self.send_error_json(405, "UNSUPPORTED")
            return
        self.reg.token_requests.append(seen)
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "refresh_token" or form.get("refresh_token") != "refresh-ok":
            self.send_error_json(401, "UNAUTHORIZED")
            return
        self.issue_token("access_token")

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        seen = Seen("GET", path, dict(self.headers))
        with self.reg.lock:
            self.reg.seen.append(seen)
            failures = self.reg.fail.get(path)
            status = failures.pop(0) if failures else 0
        if status:
            self.send_error_json(status, "UNAVAILABLE", {"Retry-After": "0"})
            return
        if path == "/token":
            self.reg.token_requests.append(seen)
            self.token(parse_qs(parts.query))
            return
        match = re.fullmatch(r"/v2/(?:(.+)/(manifests|blobs)/([^/]+))?", path)
        if match is None:
            self.send_error_json(404, "NOT_FOUND")
            return
        repo, kind, ref = match.groups()
        if not self.authorized(repo):
            return
        if repo is None:
            self.send_body(200, b"{}", {"Content-Type": "application/json"})
        elif self.reg.forbidden:
            self.send_error_json(403, "DENIED")
        elif kind == "manifests":
            self.manifest(repo, ref)
        else:
            self.blob(repo, ref)

    def authorized(self, repo: str | None) -> bool:
        header = self.headers.get("Authorization", "")
        reg = self.reg
        if reg.auth == "none":
            return True
        if reg.auth == "basic":
            if header in {f"Basic {b64(f'{u}:{p}')}" for u, p in reg.users.items()}:
                return True
            challenge = 'Basic realm="fake"'
        else:
            token = header.removeprefix("Bearer ")
            if header.startswith("Bearer ") and (token in reg.issued or token == reg.static_token):
                return True
            challenge = f'Bearer realm="{reg.base}/token",service="fake-registry"'
            if repo:
                challenge += f',scope="repository:{repo}:pull"'
        self.send_error_json(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
        return False

    def token(self, query: dict[str, list[str]]) -> None:
        reg = self.reg
        if reg.token_needs_user:
            header = self.headers.get("Authorization", "")
            if header not in {f"Basic {b64(f'{u}:{p}')}" for u, p in reg.users.items()}:
                self.send_error_json(401, "UNAUTHORIZED")
                return
        if query.get("service") != ["fake-registry"] or not query.get("scope"):
            self.send_error_json(400, "BAD_REQUEST")
            return
        self.issue_token("token")

    def issue_token(self, field_name: str) -> None:
        with self.reg.lock:
            token = f"tok{len(self.reg.issued) + 1}"
            self.reg.issued.add(token)
        body = json.dumps({field_name: token, "expires_in": 300}).encode()
        self.send_body(200, body, {"Content-Type": "application/json"})

    def manifest(self, repo: str, ref: str) -> None:
        found = self.reg.manifests.get((repo, ref))
        if found is None:
            self.send_error_json(404, "MANIFEST_UNKNOWN")
            return
        media_type, body = found
        header_digest = digest(body + b"x") if self.reg.bad_header_digest else digest(body)
        self.send_body(
            200, body, {"Content-Type": media_type, "Docker-Content-Digest": header_digest}
        )

    def blob(self, repo: str, ref: str) -> None:
        reg = self.reg
        if reg.redirect_blobs_to:
            location = f"{reg.redirect_blobs_to}/v2/{repo}/blobs/{ref}"
            self.send_body(307, b"", {"Location": location})
            return
        data = reg.corrupt.get(ref, reg.blobs.get(ref))
        if data is None:
            self.send_error_json(404, "BLOB_UNKNOWN")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and reg.supports_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        with reg.lock:
            drop = reg.drop_after.pop(ref, None)
            stall = reg.stall_after.get(ref)
        if drop is not None:
            self.wfile.write(data[start : start + drop])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if stall is not None:
            self.wfile.write(data[start : start + stall])
            self.wfile.flush()
            reg.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(data[start:])


class Harness:
    def __init__(self) -> None:
        self.registries: list[FakeRegistry] = []
        self.clients: list[RegistryClient] = []

    def registry(self, **options: Any) -> FakeRegistry:
        registry = FakeRegistry(**options)
        self.registries.append(registry)
        return registry

    def client(self, **options: Any) -> RegistryClient:
        settings: dict[str, Any] = {
            "connect_timeout": 5.0,
            "progress_timeout": 10.0,
            "max_retries": 3,
            "backoff_base": 0.001,
            "backoff_max": 0.01,
        }
        settings.update(options)
        client = RegistryClient(**settings)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for registry in self.registries:
            registry.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def repo_of(client: RegistryClient, reg: FakeRegistry, creds: Credentials | None = None) -> Any:
    return client.repository(reg.host, REPO, insecure=True, credentials=creds)


def pull_all(repo: Any, tag: str, tmp_path: Path) -> list[bytes]:
    resolved = repo.resolve(tag, Platform("linux", "amd64"))
    out = [resolved.config_data]
    for index, layer in enumerate(resolved.layers):
        dest = tmp_path / f"layer{index}"
        repo.fetch_blob(layer.digest, layer.size, dest)
        out.append(dest.read_bytes())
    return out


# --- basics -----------------------------------------------------------------------


def test_anonymous_pull(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    image = reg.add_image()
    repo = repo_of(harness.client(), reg)
    resolved = repo.resolve("v1", Platform("linux", "amd64"))
    assert resolved.digest == image.manifest_digest
    assert resolved.index is None
    assert resolved.manifest.media_type == OCI_MANIFEST
    assert [layer.digest for layer in resolved.layers] == image.layer_digests
    assert pull_all(repo, "v1", tmp_path) == [image.config, *image.layers]
    assert all("Authorization" not in s.headers for s in reg.seen)
    assert reg.count("/v2/") == 1  # pinged once per host


def test_pull_by_digest_and_docker_schema2(harness: Harness) -> None:
    reg = harness.registry()
    config = b'{"os":"linux"}'
    reg.add_blob(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor("application/vnd.docker.container.image.v1+json", config),
        "layers": [],
    }
    body = json.dumps(manifest).encode()
    manifest_digest = reg.add_manifest(REPO, None, DOCKER_MANIFEST, body)
    got = repo_of(harness.client(), reg).get_manifest(manifest_digest)
    assert (got.media_type, got.digest, got.data) == (DOCKER_MANIFEST, manifest_digest, body)


def test_for_source_uses_the_physical_location(harness: Harness) -> None:
    reg = harness.registry()
    image = reg.add_image()
    ref = parse_reference(f"{reg.host}/{REPO}:v1")
    source = PullSource(ref, parse_reference("docker.io/library/app:v1"), insecure=True)
    manifest = harness.client().for_source(source).get_manifest(source.locator)
    assert manifest.digest == image.manifest_digest


def test_manifest_and_blob_not_found(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    repo = repo_of(harness.client(), reg)
    with pytest.raises(NotFound, match=rf"{re.escape(reg.host)}/library/app:nope"):
        repo.get_manifest("nope")
    missing = digest(b"missing")
    with pytest.raises(NotFound, match=missing):
        repo.fetch_blob(missing, 7, tmp_path / "blob")
    assert not (tmp_path / "blob").exists()


def test_schema1_is_refused(harness: Harness) -> None:
    reg = harness.registry()
    body = json.dumps({"schemaVersion": 1, "name": REPO, "tag": "old", "fsLayers": []}).encode()
    reg.add_manifest(REPO, "old", "application/vnd.docker.distribution.manifest.v1+prettyjws", body)
    reg.add_manifest(REPO, "old-json", "application/json", body)
    repo = repo_of(harness.client(), reg)
    for tag in ("old", "old-json"):
        with pytest.raises(ManifestUnsupported, match="schema 1") as info:
            repo.get_manifest(tag)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_single_manifest_for_another_platform(harness: Harness) -> None:
    reg = harness.registry()
    for tag, config in {
        "s390x": {"os": "linux", "architecture": "s390x"},
        "unsaid": {"rootfs": {}},
    }.items():
        data = json.dumps(config).encode()
        reg.add_blob(data)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(CONFIG_TYPE, data),
            "layers": [],
        }
        reg.add_manifest(REPO, tag, OCI_MANIFEST, json.dumps(manifest).encode())
    repo = repo_of(harness.client(), reg)
    with pytest.raises(PlatformNotFound, match="linux/s390x, not for platform linux/amd64"):
        repo.resolve("s390x", Platform("linux", "amd64"))
    assert repo.resolve("s390x", Platform("linux", "s390x")).config_json()["os"] == "linux"
    assert repo.resolve("unsaid", Platform("linux", "amd64")).layers == ()


def test_artifact_manifest_is_not_an_image(harness: Harness) -> None:
    reg = harness.registry()
    config = b"{}"
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.cncf.helm.config.v1+json", config),
        "layers": [],
    }
    reg.add_manifest(REPO, "chart", OCI_MANIFEST, json.dumps(manifest).encode())
    with pytest.raises(ManifestUnsupported, match="not a container image"):
        repo_of(harness.client(), reg).resolve("chart")


def test_index_platform_selection(harness: Harness) -> None:
    reg = harness.registry()
    images = {name: reg.add_image(tag=None, size=100) for name in ("amd64", "arm64", "armv7")}
    attestation = reg.add_image(tag=None, size=10)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            descriptor(OCI_MANIFEST, images["amd64"].manifest,
                       platform={"os": "linux", "architecture": "amd64"}),
            descriptor(OCI_MANIFEST, images["arm64"].manifest,
                       platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
            descriptor(OCI_MANIFEST, images["armv7"].manifest,
                       platform={"os": "linux", "architecture": "arm", "variant": "v7"}),
            descriptor(OCI_MANIFEST, attestation.manifest,
                       platform={"os": "unknown", "architecture": "unknown"}),
        ],
    }  # fmt: skip
    index_digest = reg.add_manifest(REPO, "multi", OCI_INDEX, json.dumps(index).encode())
    repo = repo_of(harness.client(), reg)

    arm64 = repo.resolve("multi", Platform("linux", "arm64"))
    assert arm64.digest == index_digest  # the repo digest is the index's
    assert arm64.index is not None and arm64.index.digest == index_digest
    assert arm64.manifest.digest == images["arm64"].manifest_digest
    armv8_32 = repo.resolve("multi", Platform("linux", "arm", "v8"))  # runs v7 too
    assert armv8_32.manifest.digest == images["armv7"].manifest_digest
    if host_platform().architecture in images:
        assert repo.resolve("multi").manifest.digest == (
            images[host_platform().architecture].manifest_digest
        )

    with pytest.raises(PlatformNotFound) as info:
        repo.resolve("multi", Platform("linux", "s390x"))
    assert "linux/s390x" in info.value.message
    assert "linux/amd64, linux/arm/v7, linux/arm64/v8" in info.value.message
    assert "unknown" not in info.value.message
    assert isinstance(info.value, NotFound)


# --- auth ---------------------------------------------------------------------


def test_basic_auth(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry(auth="basic")
    image = reg.add_image()
    client = harness.client()
    with pytest.raises(RegistryUnauthorized, match="unauthorized") as info:
        repo_of(client, reg).get_manifest("v1")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(RegistryUnauthorized):
        repo_of(client, reg, Credentials("alice", "wrong")).get_manifest("v1")
    good = repo_of(client, reg, Credentials("alice", "wonderland"))
    assert pull_all(good, "v1", tmp_path) == [image.config, *image.layers]


def test_bearer_token_is_fetched_once_and_cached(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry(auth="bearer")
    image = reg.add_image()
    client = harness.client()
    assert pull_all(repo_of(client, reg), "v1", tmp_path) == [image.config, *image.layers]
    assert len(reg.token_requests) == 1
    request = reg.token_requests[0]
    assert request.method == "GET"
    assert "Authorization" not in request.headers  # anonymous token
    # a second pull (new Repository handle, same client) reuses the token
    assert repo_of(client, reg).get_manifest("v1").digest == image.manifest_digest
    assert len(reg.token_requests) == 1
    # another repository needs its own scope
    reg.add_image(repo="other/app")
    client.repository(reg.host, "other/app", insecure=True).get_manifest("v1")
    assert len(reg.token_requests) == 2


def test_bearer_token_with_basic_credentials(harness: Harness) -> None:
    reg = harness.registry(auth="bearer", token_needs_user=True)
    reg.add_image()
    client = harness.client()
    with pytest.raises(RegistryUnauthorized, match="token server") as info:
        repo_of(client, reg).get_manifest("v1")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    repo_of(client, reg, Credentials("alice", "wonderland")).get_manifest("v1")
    assert reg.token_requests[-1].headers["Authorization"] == f"Basic {b64('alice:wonderland')}"
    query = reg.seen[-2].path  # the token request path (query stripped by the server log)
    assert query == "/token"


def test_identity_token_uses_oauth2_post(harness: Harness) -> None:
    reg = harness.registry(auth="bearer")
    reg.add_image()
    repo_of(harness.client(), reg, Credentials(identity_token="refresh-ok")).get_manifest("v1")
    [request] = reg.token_requests
    assert request.method == "POST"
    form = parse_qs(request.body.decode())
    assert form["grant_type"] == ["refresh_token"]
    assert form["service"] == ["fake-registry"]
    assert form["scope"] == [f"repository:{REPO}:pull"]


def test_identity_token_falls_back_to_get(harness: Harness) -> None:
    reg = harness.registry(auth="bearer", token_post_supported=False)
    reg.add_image()
    repo_of(harness.client(), reg, Credentials(identity_token="whatever")).get_manifest("v1")
    assert [(s.method, s.path) for s in reg.seen if s.path == "/token"] == [
        ("POST", "/token"),
        ("GET", "/token"),
    ]


def test_registry_token_is_sent_as_is(harness: Harness) -> None:
    reg = harness.registry(auth="bearer")
    reg.add_image()
    repo_of(harness.client(), reg, Credentials(registry_token="static-token")).get_manifest("v1")
    assert reg.token_requests == []


def test_forbidden_is_denied(harness: Harness) -> None:
    reg = harness.registry(forbidden=True)
    reg.add_image()
    with pytest.raises(RegistryDenied, match="denied") as info:
        repo_of(harness.client(), reg).get_manifest("v1")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_tokens_are_not_shared_between_credentials(harness: Harness) -> None:
    reg = harness.registry(auth="bearer", token_needs_user=True, users={"a": "1", "b": "2"})
    reg.add_image()
    client = harness.client()
    repo_of(client, reg, Credentials("a", "1")).get_manifest("v1")
    repo_of(client, reg, Credentials("b", "2")).get_manifest("v1")
    assert len(reg.token_requests) == 2


# --- redirects, retries, resumption ------------------------------------------------


def test_blob_redirect_to_another_host_drops_authorization(
    harness: Harness, tmp_path: Path
) -> None:
    storage = harness.registry()
    reg = harness.registry(auth="bearer", redirect_blobs_to="")
    image = reg.add_image()
    for data in [image.config, *image.layers]:
        storage.add_blob(data)
    reg.redirect_blobs_to = storage.base
    assert pull_all(repo_of(harness.client(), reg), "v1", tmp_path) == [image.config, *image.layers]
    blob_requests = [s for s in storage.seen if "/blobs/" in s.path]
    assert len(blob_requests) == 3
    assert all("Authorization" not in s.headers for s in blob_requests)
    assert all(
        s.headers["Authorization"].startswith("Bearer ") for s in reg.seen if "/blobs/" in s.path
    )


def test_retries_on_503_and_429(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    image = reg.add_image()
    manifest_path = f"/v2/{REPO}/manifests/v1"
    blob_path = f"/v2/{REPO}/blobs/{image.layer_digests[0]}"
    reg.fail[manifest_path] = [503, 429]
    reg.fail[blob_path] = [500, 502]
    assert pull_all(repo_of(harness.client(), reg), "v1", tmp_path) == [image.config, *image.layers]
    assert reg.count(manifest_path) == 3
    assert reg.count(blob_path) == 3


def test_retries_give_up_with_registry_unavailable(harness: Harness) -> None:
    reg = harness.registry()
    reg.add_image()
    reg.fail[f"/v2/{REPO}/manifests/v1"] = [503] * 10
    with pytest.raises(RegistryUnavailable) as info:
        repo_of(harness.client(max_retries=2), reg).get_manifest("v1")
    assert info.value.message.startswith("RegistryUnavailable: ")
    assert "503" in info.value.message
    assert info.value.code == grpc.StatusCode.UNKNOWN
    assert reg.count(f"/v2/{REPO}/manifests/v1") == 3


def test_connection_refused_is_registry_unavailable(harness: Harness) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = harness.client(max_retries=1)
    with pytest.raises(RegistryUnavailable, match=r"^RegistryUnavailable: .*connection refused"):
        client.repository(f"127.0.0.1:{port}", REPO, insecure=True).get_manifest("v1")
    with pytest.raises(RegistryUnavailable, match="connection refused"):
        client.repository(f"127.0.0.1:{port}", REPO).get_manifest("v1")


def test_secure_registry_does_not_fall_back_to_http(harness: Harness) -> None:
    reg = harness.registry()
    reg.add_image()
    with pytest.raises(RegistryUnavailable, match="TLS error"):
        harness.client().repository(reg.host, REPO, insecure=False).get_manifest("v1")
    assert reg.seen == []  # never spoke plain HTTP


@pytest.mark.parametrize("supports_range", [True, False])
def test_dropped_connection_resumes(harness: Harness, tmp_path: Path, supports_range: bool) -> None:
    reg = harness.registry(supports_range=supports_range)
    image = reg.add_image(size=1_000_000)
    layer = image.layer_digests[0]
    reg.drop_after[layer] = 300_000
    progress: list[int] = []
    dest = tmp_path / "layer"
    repo_of(harness.client(), reg).fetch_blob(layer, 1_000_000, dest, progress=progress.append)
    assert dest.read_bytes() == image.layers[0]
    assert sum(progress) == 1_000_000
    blob_requests = [s for s in reg.seen if s.path.endswith(layer)]
    assert len(blob_requests) == 2
    assert "Range" not in blob_requests[0].headers
    assert blob_requests[1].headers["Range"] == "bytes=300000-"


def test_digest_mismatch_leaves_no_file(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    image = reg.add_image()
    layer = image.layer_digests[0]
    reg.corrupt[layer] = os.urandom(len(image.layers[0]))
    dest = tmp_path / "layer"
    with pytest.raises(DigestMismatch, match=layer) as info:
        repo_of(harness.client(), reg).fetch_blob(layer, len(image.layers[0]), dest)
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_oversized_blob_is_refused(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    image = reg.add_image()
    layer = image.layer_digests[1]
    with pytest.raises(DigestMismatch, match="larger"):
        repo_of(harness.client(), reg).fetch_blob(layer, 10, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_manifest_digest_is_verified(harness: Harness) -> None:
    reg = harness.registry()
    image = reg.add_image()
    reg.manifests[(REPO, image.manifest_digest)] = (OCI_MANIFEST, image.manifest + b" ")
    repo = repo_of(harness.client(), reg)
    with pytest.raises(DigestMismatch, match="manifest"):
        repo.get_manifest(image.manifest_digest)
    reg.bad_header_digest = True
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        repo.get_manifest("v1")


def test_stalled_body_times_out(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    image = reg.add_image()
    layer = image.layer_digests[0]
    reg.stall_after[layer] = 1000
    dest = tmp_path / "layer"
    with pytest.raises(RegistryUnavailable, match=r"^RegistryUnavailable: no data .* 0\.3s"):
        repo_of(harness.client(progress_timeout=0.3), reg).fetch_blob(layer, 300_000, dest)
    assert not dest.exists()


def test_cancel(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry()
    image = reg.add_image(size=2_000_000)
    layer = image.layer_digests[0]
    repo = repo_of(harness.client(), reg)
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        repo.fetch_blob(layer, 2_000_000, tmp_path / "a", cancel=event)

    event = threading.Event()
    with pytest.raises(Cancelled):
        repo.fetch_blob(
            layer, 2_000_000, tmp_path / "b", cancel=event, progress=lambda n: event.set()
        )
    with pytest.raises(Cancelled):
        repo.fetch_blob(layer, 2_000_000, tmp_path / "c", cancel=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_parallel_blob_downloads_share_a_client(harness: Harness, tmp_path: Path) -> None:
    reg = harness.registry(auth="bearer")
    images = [reg.add_image(tag=f"t{i}", size=200_000) for i in range(3)]
    client = harness.client()
    errors: list[BaseException] = []
    jobs = [
        (d, data)
        for image in images
        for d, data in zip(image.layer_digests, image.layers, strict=True)
    ]

    def fetch(index: int, blob: str, data: bytes) -> None:
        try:
            dest = tmp_path / f"blob{index}"
            repo_of(client, reg).fetch_blob(blob, len(data), dest)
            assert dest.read_bytes() == data
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=fetch, args=(i, d, data)) for i, (d, data) in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert reg.count("/v2/") == 1


# --- platforms (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", Platform("linux", "amd64")),
        ("aarch64", Platform("linux", "arm64")),
        ("armv7l", Platform("linux", "arm", "v7")),
        ("armv6l", Platform("linux", "arm", "v6")),
        ("s390x", Platform("linux", "s390x")),
    ],
)
def test_host_platform_uses_goarch_names(
    monkeypatch: pytest.MonkeyPatch, machine: str, expected: Platform
) -> None:
    import imageservice.platform as platform_module

    monkeypatch.setattr(platform_module._pyplatform, "machine", lambda: machine)
    assert host_platform() == expected


@pytest.mark.parametrize(
    ("want", "expected"),
    [
        (Platform("linux", "arm", "v7"), ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
        (Platform("linux", "arm64", "v8"), ["linux/arm64"]),
        (Platform("linux", "x86_64"), ["linux/amd64"]),
        (Platform("linux", "arm"), ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]),
    ],
)
def test_compatible_platforms(want: Platform, expected: list[str]) -> None:
    from imageservice.platform import compatible_platforms

    assert [str(p) for p in compatible_platforms(want)] == expected


def test_select_prefers_exact_variant_and_accepts_platformless_entries() -> None:
    from imageservice.manifest import MANIFEST_TYPES
    from imageservice.platform import select_manifest

    def entry(name: str, **platform: str) -> dict[str, Any]:
        return {"mediaType": OCI_MANIFEST, "digest": name, "platform": platform or None}

    entries = [
        entry("v6", os="linux", architecture="arm", variant="v6"),
        entry("v7", os="linux", architecture="arm", variant="v7"),
    ]
    chosen = select_manifest(entries, Platform("linux", "arm", "v7"), MANIFEST_TYPES, "x")
    assert chosen["digest"] == "v7"
    bare = [{"mediaType": OCI_MANIFEST, "digest": "only"}]
    assert (
        select_manifest(bare, Platform("linux", "amd64"), MANIFEST_TYPES, "x")["digest"] == "only"
    )
    windows = [entry("win", os="windows", architecture="amd64")]
    with pytest.raises(PlatformNotFound, match="windows/amd64"):
        select_manifest(windows, Platform("linux", "amd64"), MANIFEST_TYPES, "x")
