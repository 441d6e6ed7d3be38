"""A minimal OCI distribution *push* client, written with requests.

Deliberately independent of imageservice/: tests use it to put content into a
real registry that crib then pulls, which proves the two interoperate.

Blobs: HEAD to skip existing ones, then a cross-repository mount when the blob
was pushed to another repository in this session, else a monolithic upload
(POST /blobs/uploads/ then PUT <location>?digest=). Manifests: PUT by digest
for an index's children, then PUT by each tag (skipped when HEAD already
reports that digest). Auth: Basic, or Bearer tokens fetched from the realm of
a ``WWW-Authenticate`` challenge (with Basic credentials if given).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin

import requests

from hack.testimages import model
from hack.testimages.model import ImageInfo

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
TIMEOUT = 60.0

Body = Callable[[], bytes | IO[bytes]] | None


class PushError(RuntimeError):
    """The registry refused or broke a push; the message names the request."""


def _check(resp: requests.Response, expected: tuple[int, ...], what: str) -> None:
    if resp.status_code not in expected:
        raise PushError(f"{what}: HTTP {resp.status_code} from {resp.url}: {resp.text[:300]}")


class RegistryClient:
    """Push side of the distribution API for one registry (``host:port``)."""

    def __init__(self, registry: str, auth: tuple[str, str] | None = None,
                 scheme: str = "http", session: requests.Session | None = None) -> None:
        self.base = f"{scheme}://{registry}"
        self.auth = auth
        self.session = session or requests.Session()
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._basic = False
        self._blob_home: dict[str, str] = {}  # digest -> a repository that has it

    def close(self) -> None:
        self.session.close()

    # -- auth ------------------------------------------------------------

    def _headers(self, scope: str) -> dict[str, str]:
        token = self._tokens.get(scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme = challenge.split(" ", 1)[0].lower()
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        if scheme == "basic":
            if self.auth is None:
                raise PushError(f"{self.base} wants Basic credentials and none were given")
            self._basic = True
            return
        if scheme != "bearer" or "realm" not in params:
            raise PushError(f"unsupported auth challenge from {self.base}: {challenge!r}")
        query = {"service": params.get("service", ""), "scope": scope}
        resp = self.session.get(params["realm"], params=query, auth=self.auth, timeout=TIMEOUT)
        _check(resp, (200,), f"token for {scope}")
        body = resp.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise PushError(f"token endpoint {params['realm']} returned no token")
        self._tokens[scope] = token

    def _request(self, method: str, url: str, repo: str, body: Body = None,
                 headers: Mapping[str, str] | None = None, **kwargs: Any) -> requests.Response:
        scope = f"repository:{repo}:pull,push"
        for attempt in range(2):
            merged = {**self._headers(scope), **(headers or {})}
            data = body() if body else None
            try:
                resp = self.session.request(
                    method, url, data=data, headers=merged, timeout=TIMEOUT,
                    auth=self.auth if self._basic else None, **kwargs)
            finally:
                if data is not None and hasattr(data, "close"):
                    data.close()
            challenge = resp.headers.get("WWW-Authenticate", "")
            if resp.status_code != 401 or not challenge or attempt:
                return resp
            self._authenticate(challenge, scope)
        raise AssertionError("unreachable")

    # -- blobs -----------------------------------------------------------

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self._request("HEAD", f"{self.base}/v2/{repo}/blobs/{digest}", repo)
        if resp.status_code == 200:
            return True
        _check(resp, (404,), f"HEAD blob {repo}@{digest}")
        return False

    def push_blob(self, repo: str, digest: str, path: Path) -> bool:
        """Upload ``path`` as ``digest``; False when the registry already had it."""
        if self.blob_exists(repo, digest):
            self._blob_home.setdefault(digest, repo)
            return False
        uploads = f"{self.base}/v2/{repo}/blobs/uploads/"
        home = self._blob_home.get(digest)
        params = {"mount": digest, "from": home} if home and home != repo else None
        resp = self._request("POST", uploads, repo, params=params)
        if resp.status_code == 201 and params:
            return True
        _check(resp, (202,), f"start upload of {digest} to {repo}")
        location = urljoin(uploads, resp.headers["Location"])
        sep = "&" if "?" in location else "?"
        resp = self._request(
            "PUT", f"{location}{sep}digest={digest}", repo, body=lambda: path.open("rb"),
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(path.stat().st_size)})
        _check(resp, (201,), f"upload of {digest} to {repo}")
        self._blob_home.setdefault(digest, repo)
        return True

    # -- manifests -------------------------------------------------------

    def manifest_digest(self, repo: str, reference: str) -> str | None:
        resp = self._request("HEAD", f"{self.base}/v2/{repo}/manifests/{reference}", repo,
                             headers={"Accept": ", ".join(model.ALL_MANIFEST_TYPES)})
        if resp.status_code == 404:
            return None
        _check(resp, (200,), f"HEAD manifest {repo}:{reference}")
        return resp.headers.get("Docker-Content-Digest")

    def push_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        resp = self._request("PUT", f"{self.base}/v2/{repo}/manifests/{reference}", repo,
                             body=lambda: data, headers={"Content-Type": media_type})
        _check(resp, (201,), f"PUT manifest {repo}:{reference}")
        returned = resp.headers.get("Docker-Content-Digest")
        if returned and returned != digest:
            raise PushError(f"registry stored {repo}:{reference} as {returned}, expected {digest}")
        return digest

    # -- images ----------------------------------------------------------

    def push_image(self, info: ImageInfo) -> None:
        repo = info.repository
        for digest in info.blobs:
            self.push_blob(repo, digest, info.blob_path(digest))
        for digest in info.child_manifests:
            if self.manifest_digest(repo, digest) == digest:
                continue
            data = info.blob_path(digest).read_bytes()
            self.push_manifest(repo, digest, data, json.loads(data)["mediaType"])
        top = info.blob_path(info.manifest_digest).read_bytes()
        for tag in info.tags:
            if self.manifest_digest(repo, tag) != info.manifest_digest:
                self.push_manifest(repo, tag, top, info.media_type)


def push_all(registry: str, images: Mapping[str, ImageInfo] | Iterable[ImageInfo],
             auth: tuple[str, str] | None = None, scheme: str = "http",
             workers: int = 4) -> None:
    """Push every image (blobs, child manifests, tags) to ``registry`` (``host:port``).

    Images are pushed by ``workers`` threads, each with its own client/session.
    """
    infos = list(images.values()) if isinstance(images, Mapping) else list(images)
    local = threading.local()
    clients: list[RegistryClient] = []
    lock = threading.Lock()

    def push_one(info: ImageInfo) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = RegistryClient(registry, auth=auth, scheme=scheme)
            with lock:
                clients.append(client)
        client.push_image(info)

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for future in [pool.submit(push_one, info) for info in infos]:
                future.result()
    finally:
        for client in clients:
            client.close()
