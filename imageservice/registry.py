"""OCI distribution client: manifests, platform resolution and blob downloads.

One :class:`RegistryClient` per daemon (thread-safe; see registry_transport for
sessions, retries, redirects and tokens); :meth:`RegistryClient.repository`
gives a :class:`Repository` for one ``host/path`` and one set of credentials.
Blocking: callers run it in threads (``asyncio.to_thread``).

Blobs stream in chunks into a path or file object while being hashed; size and
digest are checked at the end.  A dropped connection resumes with ``Range``
(or re-reads and skips what it has when the server ignores ranges); a body
that sends nothing for ``progress_timeout`` seconds fails the fetch.  A cancel
check (``threading.Event`` or callable) is polled between chunks and retries.

Errors (each carries its gRPC code):

- :class:`RegistryUnavailable` (UNKNOWN, message starts ``RegistryUnavailable:``;
  the kubelet strips UNKNOWN codes and matches the prefix): connection refused,
  DNS, TLS, timeouts, stalls, 5xx/429 after the retries;
- :class:`RegistryUnauthorized` (UNAUTHENTICATED) / :class:`RegistryDenied`
  (PERMISSION_DENIED): 401 / 403 once the credentials have been tried;
- ``NotFound``: unknown manifest, tag or blob; ``PlatformNotFound`` (a NotFound)
  when an index has nothing for the platform;
- :class:`ManifestUnsupported` (FAILED_PRECONDITION): schema 1, non-image
  artifacts, malformed manifests;
- :class:`DigestMismatch` (DATA_LOSS): content that does not match its digest
  or size;
- :class:`RegistryError` (UNKNOWN): any other unexpected answer;
- ``Cancelled`` when the cancel check fires.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Callable
from contextlib import closing
from typing import Protocol

import requests
import urllib3

from cri import tracing
from cri.errors import InvalidArgument, NotFound
from imageservice.auth import Credentials, TokenKey, parse_challenges
from imageservice.manifest import (
    ACCEPT_MANIFESTS,
    Descriptor,
    DigestMismatch,
    Manifest,
    ManifestUnsupported,
    ResolvedImage,
    decode_manifest,
    image_manifest_parts,
)
from imageservice.platform import (
    Platform,
    PlatformNotFound,
    check_config_platform,
    host_platform,
    select_manifest,
)
from imageservice.reference import split_digest
from imageservice.registries import PullSource
from imageservice.registry_transport import (
    CancelCheck,
    Endpoint,
    RegistryDenied,
    RegistryError,
    RegistryTransport,
    RegistryUnauthorized,
    RegistryUnavailable,
    basic_auth,
    check_cancel,
    describe_error,
    server_message,
    sleep,
)

log = logging.getLogger(__name__)

__all__ = [
    "CancelCheck",
    "DigestMismatch",
    "ManifestUnsupported",
    "PlatformNotFound",
    "RegistryClient",
    "RegistryDenied",
    "RegistryError",
    "RegistryUnauthorized",
    "RegistryUnavailable",
    "Repository",
    "ResolvedImage",
]

MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 128 << 10


class Sink(Protocol):
    """Where blob bytes go: a binary file, a BytesIO, the content store's Ingest."""

    def write(self, data: bytes, /) -> object: ...


class _Dropped(Exception):
    """A body ended early (connection dropped or truncated): worth a retry."""


class RegistryClient(RegistryTransport):
    """The daemon's registry client; see the module docstring."""

    def repository(
        self,
        host: str,
        path: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
    ) -> Repository:
        """A handle on ``host/path`` (host as the API uses it: ``registry-1.docker.io``)."""
        return Repository(self, host, path, insecure, credentials)

    def for_source(self, source: PullSource, credentials: Credentials | None = None) -> Repository:
        """A handle on the physical location of a registries.conf pull source."""
        return Repository(self, source.host, source.repository, source.insecure, credentials)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Repository:
    """Manifests and blobs of one repository, with one set of credentials."""

    def __init__(
        self,
        client: RegistryClient,
        host: str,
        path: str,
        insecure: bool,
        credentials: Credentials | None,
    ) -> None:
        self.client, self.host, self.path = client, host, path
        self.insecure, self.credentials = insecure, credentials
        self.scope = f"repository:{path}:pull"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.path}"

    def _ref_name(self, ref: str) -> str:
        return f"{self.name}{'@' if ':' in ref else ':'}{ref}"

    # --- auth -----------------------------------------------------------------

    def _authorization(self, endpoint: Endpoint, cancel: CancelCheck, fresh: bool) -> str | None:
        creds = self.credentials
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        bearer = endpoint.challenge("bearer")
        if bearer is not None and bearer.realm:
            key = TokenKey(self.host, self.path, self.scope, creds.identity() if creds else "")
            token = None if fresh else self.client.tokens.get(key)
            if token is None:
                token = self.client.fetch_token(
                    bearer,
                    self.scope,
                    creds,
                    registry_host=self.host,
                    insecure=self.insecure,
                    cancel=cancel,
                )
                self.client.tokens.put(key, token)
            return f"Bearer {token.token}"
        if endpoint.challenge("basic") is not None and creds is not None and creds.has_basic:
            return basic_auth(creds)
        return None

    def _request(
        self, path: str, headers: dict[str, str], cancel: CancelCheck
    ) -> requests.Response:
        """GET ``path`` with auth: one retry after a 401 with fresh challenges/token."""
        endpoint = self.client.endpoint(self.host, self.insecure, cancel)
        for attempt in range(2):
            request_headers = dict(headers)
            auth = self._authorization(endpoint, cancel, fresh=attempt > 0)
            if auth:
                request_headers["Authorization"] = auth
            resp = self.client.follow(
                "GET",
                endpoint.base_url + path,
                request_headers,
                insecure=self.insecure,
                cancel=cancel,
            )
            if resp.status_code != 401 or attempt:
                break
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            if challenges:
                self.client.learn_challenges(self.host, self.insecure, challenges)
                endpoint = Endpoint(endpoint.base_url, tuple(challenges))
        if resp.status_code in (401, 403):
            detail = server_message(resp)
            resp.close()
            who = "anonymous access" if self.credentials is None else "the given credentials"
            cls = RegistryUnauthorized if resp.status_code == 401 else RegistryDenied
            word = "unauthorized" if resp.status_code == 401 else "denied"
            raise cls(
                f"{word}: {self.host} refused {who} to {self.path} (HTTP {resp.status_code}"
                f"{detail})"
            )
        return resp

    # --- manifests ------------------------------------------------------------

    def get_manifest(self, ref: str, *, cancel: CancelCheck = None) -> Manifest:
        """The manifest or index at ``ref`` (tag or digest), digest-verified."""
        where = self._ref_name(ref)
        with tracing.child_span("registry.manifest", **{"image.ref": where}):
            for attempt in range(self.client.max_retries + 1):
                resp = self._request(
                    f"/v2/{self.path}/manifests/{ref}", {"Accept": ACCEPT_MANIFESTS}, cancel
                )
                with closing(resp):
                    if resp.status_code == 404:
                        raise NotFound(f"manifest unknown: {where} not found{server_message(resp)}")
                    if resp.status_code != 200:
                        raise RegistryError(
                            f"{self.host} answered HTTP {resp.status_code} for manifest"
                            f" {where}{server_message(resp)}"
                        )
                    try:
                        data = _read_limited(resp, MAX_MANIFEST_BYTES, where)
                    except _Dropped as exc:
                        if attempt == self.client.max_retries:
                            raise RegistryUnavailable(f"reading manifest {where}: {exc}") from None
                        sleep(self.client.backoff(attempt + 1), cancel)
                        continue
                    content_type = resp.headers.get("Content-Type", "")
                    header_digest = resp.headers.get("Docker-Content-Digest", "")
                return decode_manifest(data, content_type, ref, header_digest, where)
        raise AssertionError("unreachable")

    def resolve(
        self, ref: str, platform: Platform | None = None, *, cancel: CancelCheck = None
    ) -> ResolvedImage:
        """Follow ``ref`` through an index (if any) to the image manifest for ``platform``.

        Also fetches the (small) image config; a manifest outside an index whose
        config names another platform is PlatformNotFound.
        """
        want = platform or host_platform()
        top = self.get_manifest(ref, cancel=cancel)
        manifest = top
        for _depth in range(3):
            if not manifest.is_index:
                break
            desc = select_manifest(
                manifest.manifests(), want, manifest.selectable_types, self._ref_name(ref)
            )
            child_digest = Descriptor.from_json(desc, f"index {manifest.digest}").digest
            manifest = self.get_manifest(child_digest, cancel=cancel)
        else:
            raise ManifestUnsupported(f"{self._ref_name(ref)}: indexes nested too deeply")
        config, layers = image_manifest_parts(manifest)
        config_data = self.fetch_blob_bytes(config.digest, config.size, cancel=cancel)
        index = top if top is not manifest else None
        resolved = ResolvedImage(top.digest, index, manifest, config, layers, config_data)
        if index is None:
            check_config_platform(resolved.config_json(), want, self._ref_name(ref))
        return resolved

    # --- blobs ----------------------------------------------------------------

    def fetch_blob(
        self,
        digest: str,
        size: int | None,
        dest: str | os.PathLike[str] | Sink,
        *,
        cancel: CancelCheck = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream blob ``digest`` into ``dest`` (a path we create, or a writable file object).

        Verifies size and digest at the end; on any failure a path ``dest`` is
        removed (a file object is left to the caller).  ``progress`` is called
        with the number of new bytes after each chunk.
        """
        split_digest(digest)  # InvalidArgument for a malformed digest
        if not isinstance(dest, str | os.PathLike):
            self._fetch_traced(digest, size, dest, cancel, progress)
            return
        done = False
        try:
            with open(dest, "wb") as out:
                self._fetch_traced(digest, size, out, cancel, progress)
            done = True
        finally:
            if not done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dest)

    def _fetch_traced(
        self,
        digest: str,
        size: int | None,
        out: Sink,
        cancel: CancelCheck,
        progress: Callable[[int], None] | None,
    ) -> None:
        attributes = {"blob.digest": digest, "registry.host": self.host}
        with tracing.child_span("registry.blob", **attributes):
            self._download(digest, size, out, cancel, progress)

    def fetch_blob_bytes(
        self,
        digest: str,
        size: int | None,
        *,
        max_bytes: int = 64 << 20,
        cancel: CancelCheck = None,
    ) -> bytes:
        """A small blob (an image config) in memory."""
        if size is not None and size > max_bytes:
            raise InvalidArgument(f"blob {digest} of {size} bytes is larger than {max_bytes}")
        buffer = io.BytesIO()
        self.fetch_blob(digest, size, buffer, cancel=cancel)
        return buffer.getvalue()

    def _download(
        self,
        digest: str,
        size: int | None,
        out: Sink,
        cancel: CancelCheck,
        progress: Callable[[int], None] | None,
    ) -> None:
        algorithm, _ = split_digest(digest)
        hasher = hashlib.new(algorithm)
        written, drops = 0, 0
        what = f"blob {digest} of {self.name}"
        while True:
            headers = {"Accept-Encoding": "identity"}
            if written:
                headers["Range"] = f"bytes={written}-"
            resp = self._request(f"/v2/{self.path}/blobs/{digest}", headers, cancel)
            try:
                skip = self._skip_for(resp, written, what)
                stream = resp.raw.stream(CHUNK, decode_content=False)
                while True:
                    check_cancel(cancel, f"fetching {what}")
                    try:
                        chunk = next(stream)
                    except StopIteration:
                        break
                    except urllib3.exceptions.ReadTimeoutError:
                        raise RegistryUnavailable(
                            f"no data from {self.host} for {self.client.progress_timeout:g}s"
                            f" while fetching {what} ({written} of {size} bytes)"
                        ) from None
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        raise _Dropped(describe_error(exc)) from exc
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                        if not chunk:
                            continue
                    written += len(chunk)
                    if size is not None and written > size:
                        raise DigestMismatch(f"{what} is larger than the {size} bytes announced")
                    hasher.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
                if size is not None and written < size:
                    raise _Dropped(f"body ended after {written} of {size} bytes")
            except _Dropped as exc:
                drops += 1
                if drops > self.client.max_retries:
                    raise RegistryUnavailable(
                        f"connection to {self.host} kept failing while fetching {what}: {exc}"
                    ) from None
                log.info("%s: %s; retrying from byte %d", what, exc, written)
                sleep(self.client.backoff(drops), cancel)
                continue
            finally:
                resp.close()
            break
        if size is not None and written != size:
            raise DigestMismatch(f"{what}: got {written} bytes, expected {size}")
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != digest:
            raise DigestMismatch(f"{what}: content has digest {actual}")

    def _skip_for(self, resp: requests.Response, written: int, what: str) -> int:
        """How many leading body bytes to drop to continue at ``written``."""
        if resp.status_code == 404:
            raise NotFound(f"{what} not found{server_message(resp)}")
        if resp.status_code == 200:
            return written  # a fresh full body (ranges unsupported): skip what we have
        if resp.status_code == 206 and written:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start is not None and start <= written:
                return written - start
            raise _Dropped(f"unusable Content-Range {resp.headers.get('Content-Range')!r}")
        raise RegistryError(
            f"{self.host} answered HTTP {resp.status_code} for {what}{server_message(resp)}"
        )


def _content_range_start(value: str) -> int | None:
    unit, _, spec = value.strip().partition(" ")
    start = spec.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _read_limited(resp: requests.Response, limit: int, where: str) -> bytes:
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in resp.raw.stream(CHUNK, decode_content=True):
            total += len(chunk)
            if total > limit:
                raise ManifestUnsupported(f"manifest {where} is larger than {limit} bytes")
            parts.append(chunk)
    except urllib3.exceptions.ReadTimeoutError:
        raise RegistryUnavailable(f"no data while reading manifest {where}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _Dropped(describe_error(exc)) from exc
    return b"".join(parts)
