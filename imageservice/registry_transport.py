"""HTTP transport for the registry client: sessions, retries, redirects, ping, tokens.

:class:`RegistryTransport` holds a pooled ``requests.Session`` per host (never
mutated after creation, so threads can share them), what each registry's
``/v2/`` ping said (scheme, auth challenges) and the bearer-token cache.

- HTTPS is verified against the system CAs; an *insecure* registry gets
  ``verify=False`` and, when HTTPS fails, plain HTTP.
- Transport errors, timeouts, 5xx and 429 are retried with exponential backoff
  (``Retry-After`` honoured); the last failure is :class:`RegistryUnavailable`.
- Redirects are followed by hand so ``Authorization`` never leaves the origin.
- Tokens: GET ``realm?service=&scope=`` (Basic credentials if any), or the
  OAuth2 POST ``grant_type=refresh_token`` when an identity token is given.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import grpc
import requests
import urllib3

from cri import tracing
from cri.errors import Cancelled, CribError
from imageservice.auth import (
    BearerToken,
    Challenge,
    Credentials,
    TokenCache,
    parse_challenges,
    parse_token_response,
)

log = logging.getLogger(__name__)

CancelCheck = threading.Event | Callable[[], bool] | None
MAX_REDIRECTS = 10
CLIENT_ID = "crib"
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


class RegistryError(CribError):
    """A registry answered in a way crib cannot use (code UNKNOWN)."""


class RegistryUnavailable(RegistryError):
    """The registry cannot be reached or keeps failing; the kubelet matches the prefix."""

    def __init__(self, message: str) -> None:
        super().__init__("RegistryUnavailable: " + message)


class RegistryUnauthorized(RegistryError):
    code = grpc.StatusCode.UNAUTHENTICATED


class RegistryDenied(RegistryUnauthorized):
    code = grpc.StatusCode.PERMISSION_DENIED


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # scheme://host
    challenges: tuple[Challenge, ...]

    def challenge(self, scheme: str) -> Challenge | None:
        return next((c for c in self.challenges if c.scheme == scheme), None)


def describe_error(exc: BaseException) -> str:
    """A short human reason for a transport exception."""
    text = str(exc)
    for needle in (
        "Connection refused",
        "Name or service not known",
        "Temporary failure in name resolution",
        "No route to host",
        "Network is unreachable",
        "Connection reset by peer",
        "certificate verify failed",
        "wrong version number",
        "timed out",
        "Read timed out",
    ):
        if needle in text:
            return needle.lower()
    return text[:300]


def server_message(resp: requests.Response) -> str:
    """The distribution error body's first ``code: message``, if any."""
    try:
        errors = resp.json().get("errors") or []
        first = errors[0]
        return f": {first.get('code', '')} {first.get('message', '')}".rstrip()
    except Exception:  # any non-conforming body
        return ""


class RegistryTransport:
    """Shared HTTP machinery; see the module docstring."""

    def __init__(
        self,
        *,
        token_cache: TokenCache | None = None,
        user_agent: str = "crib/0.1",
        connect_timeout: float = 30.0,
        progress_timeout: float = 60.0,
        max_retries: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        ca_bundle: str | None = None,
        pool_size: int = 16,
    ) -> None:
        self.tokens = token_cache if token_cache is not None else TokenCache()
        self.user_agent = user_agent
        self.connect_timeout = connect_timeout
        self.progress_timeout = progress_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._verify: str | bool = ca_bundle or (_SYSTEM_CA if os.path.exists(_SYSTEM_CA) else True)
        self._pool_size = pool_size
        self._lock = threading.Lock()
        self._sessions: dict[tuple[str, bool], requests.Session] = {}
        self._endpoints: dict[tuple[str, bool], Endpoint] = {}
        self._ping_locks: dict[tuple[str, bool], threading.Lock] = {}

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            self._endpoints.clear()
        for session in sessions:
            _close_session(session)

    # --- transport ------------------------------------------------------------

    def _session(self, host: str, insecure: bool) -> requests.Session:
        key = (host, insecure)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = requests.Session()
                session.trust_env = False  # no .netrc; proxies are applied per request
                session.verify = False if insecure else self._verify
                session.headers["User-Agent"] = self.user_agent
                adapter = requests.adapters.HTTPAdapter(
                    pool_connections=2, pool_maxsize=self._pool_size, max_retries=0
                )
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._sessions[key] = session
                if insecure:
                    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            return session

    def backoff(self, attempt: int, resp: requests.Response | None = None) -> float:
        if resp is not None:
            after = resp.headers.get("Retry-After", "")
            if after.isdigit():
                return min(float(after), self.backoff_max)
        delay = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return delay * random.uniform(0.5, 1.0)

    def send(
        self,
        method: str,
        url: str,
        *,
        insecure: bool,
        headers: dict[str, str],
        cancel: CancelCheck,
        data: dict[str, str] | None = None,
        retries: int | None = None,
    ) -> requests.Response:
        """One request with retries on transport errors, 5xx and 429; other statuses returned."""
        host = urlsplit(url).netloc
        session = self._session(host, insecure)
        retries = self.max_retries if retries is None else retries
        timeout = (self.connect_timeout, self.progress_timeout)
        last_resp: requests.Response | None = None
        for attempt in range(retries + 1):
            check_cancel(cancel, f"{method} {url}")
            if attempt:
                sleep(self.backoff(attempt, last_resp), cancel)
            last_resp = None
            try:
                resp = session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    stream=True,
                    allow_redirects=False,
                    timeout=timeout,
                    proxies=requests.utils.get_environ_proxies(url),
                )
            except requests.exceptions.SSLError as exc:
                raise RegistryUnavailable(
                    f"TLS error talking to {host}: {describe_error(exc)}"
                ) from exc
            except requests.exceptions.RequestException as exc:
                if attempt == retries:
                    raise RegistryUnavailable(
                        f"cannot reach {host} ({method} {url}): {describe_error(exc)}"
                        f" after {attempt + 1} attempt(s)"
                    ) from exc
                log.info("retrying %s %s after error: %s", method, url, describe_error(exc))
                continue
            if resp.status_code not in _RETRY_STATUS:
                return resp
            if attempt == retries:
                detail = server_message(resp)
                resp.close()
                raise RegistryUnavailable(
                    f"{host} answered {method} {url} with HTTP {resp.status_code}{detail}"
                    f" after {attempt + 1} attempt(s)"
                )
            log.info("retrying %s %s after HTTP %d", method, url, resp.status_code)
            last_resp = resp
            resp.close()
        raise AssertionError("unreachable")

    def follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        insecure: bool,
        cancel: CancelCheck,
    ) -> requests.Response:
        """``send`` following redirects; Authorization is dropped once we leave the origin."""
        origin = urlsplit(url).netloc
        left_origin = False
        for _ in range(MAX_REDIRECTS + 1):
            here = urlsplit(url).netloc
            left_origin = left_origin or here != origin
            hop_headers = headers
            if left_origin:
                hop_headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            resp = self.send(
                method,
                url,
                insecure=insecure and not left_origin,
                headers=hop_headers,
                cancel=cancel,
            )
            location = resp.headers.get("Location")
            if resp.status_code not in _REDIRECT_STATUS or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            if resp.status_code == 303:
                method = "GET"
        raise RegistryUnavailable(f"too many redirects from {origin}")

    def endpoint(self, host: str, insecure: bool, cancel: CancelCheck) -> Endpoint:
        """Ping ``/v2/`` once per host: learn the scheme and the auth challenges."""
        key = (host, insecure)
        with self._lock:
            endpoint = self._endpoints.get(key)
            if endpoint is not None:
                return endpoint
            lock = self._ping_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                endpoint = self._endpoints.get(key)
            if endpoint is None:
                endpoint = self._ping(host, insecure, cancel)
                with self._lock:
                    self._endpoints[key] = endpoint
            return endpoint

    def _ping(self, host: str, insecure: bool, cancel: CancelCheck) -> Endpoint:
        schemes = ["https", "http"] if insecure else ["https"]
        with tracing.child_span("registry.ping", **{"registry.host": host}):
            for index, scheme in enumerate(schemes):
                fallback = index + 1 < len(schemes)
                url = f"{scheme}://{host}/v2/"
                try:
                    resp = self.send(
                        "GET",
                        url,
                        insecure=insecure,
                        headers={},
                        cancel=cancel,
                        retries=0 if fallback else None,
                    )
                except RegistryUnavailable as exc:
                    if fallback:
                        log.info("%s: HTTPS failed (%s), trying plain HTTP", host, exc.message)
                        continue
                    raise
                with closing(resp):
                    header = resp.headers.get("WWW-Authenticate", "")
                    challenges = parse_challenges(header) if resp.status_code == 401 else []
                return Endpoint(f"{scheme}://{host}", tuple(challenges))
        raise AssertionError("unreachable")

    def learn_challenges(self, host: str, insecure: bool, challenges: list[Challenge]) -> None:
        with self._lock:
            endpoint = self._endpoints.get((host, insecure))
            if endpoint is not None:
                self._endpoints[(host, insecure)] = Endpoint(endpoint.base_url, tuple(challenges))

    def fetch_token(
        self,
        challenge: Challenge,
        scope: str,
        credentials: Credentials | None,
        *,
        registry_host: str,
        insecure: bool,
        cancel: CancelCheck,
    ) -> BearerToken:
        realm, service = challenge.realm, challenge.params.get("service", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryUnavailable(f"{registry_host} sent an unusable token realm {realm!r}")
        realm_insecure = insecure and urlsplit(realm).netloc == registry_host
        with tracing.child_span("registry.token", **{"registry.scope": scope}):
            resp: requests.Response | None = None
            if credentials is not None and credentials.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": credentials.identity_token,
                    "client_id": CLIENT_ID,
                    "scope": scope,
                }
                if service:
                    form["service"] = service
                resp = self.send(
                    "POST", realm, insecure=realm_insecure, headers={}, data=form, cancel=cancel
                )
                if resp.status_code in (404, 405):  # no OAuth2 POST support: fall back to GET
                    resp.close()
                    resp = None
            if resp is None:
                query = urlencode(
                    {"service": service, "scope": scope} if service else {"scope": scope}
                )
                headers = {}
                if credentials is not None and credentials.has_basic:
                    headers["Authorization"] = basic_auth(credentials)
                sep = "&" if urlsplit(realm).query else "?"
                resp = self.follow(
                    "GET", realm + sep + query, headers, insecure=realm_insecure, cancel=cancel
                )
            with closing(resp):
                if resp.status_code in (401, 403):
                    raise RegistryUnauthorized(
                        f"unauthorized: token server {urlsplit(realm).netloc} refused access to"
                        f" {scope} on {registry_host} (HTTP {resp.status_code}"
                        f"{server_message(resp)})"
                    )
                if resp.status_code != 200:
                    raise RegistryUnavailable(
                        f"token server {urlsplit(realm).netloc} answered HTTP {resp.status_code}"
                    )
                try:
                    return parse_token_response(resp.json())
                except ValueError as exc:
                    raise RegistryUnavailable(
                        f"invalid answer from token server {urlsplit(realm).netloc}: {exc}"
                    ) from None


def _close_session(session: requests.Session) -> None:
    """Close a session's pooled connections now (urllib3 2.x leaves them to the GC)."""
    for adapter in session.adapters.values():
        poolmanager = getattr(adapter, "poolmanager", None)
        pools = getattr(poolmanager, "pools", None)
        if pools is None:
            continue
        for key in pools.keys():  # noqa: SIM118 (iterating the container itself raises)
            pool = pools.get(key)
            if pool is not None:
                pool.close()
    session.close()


def basic_auth(credentials: Credentials) -> str:
    """The ``Authorization`` value for HTTP Basic with ``credentials``."""
    raw = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def check_cancel(cancel: CancelCheck, what: str) -> None:
    if cancel is None:
        return
    fired = cancel.is_set() if isinstance(cancel, threading.Event) else cancel()
    if fired:
        raise Cancelled(f"{what}: cancelled")


def sleep(delay: float, cancel: CancelCheck) -> None:
    """Sleep ``delay`` seconds, waking up early (and raising Cancelled) on cancel."""
    if isinstance(cancel, threading.Event):
        if cancel.wait(delay):
            raise Cancelled("cancelled while waiting to retry")
        return
    deadline = time.monotonic() + delay
    while (left := deadline - time.monotonic()) > 0:
        check_cancel(cancel, "waiting to retry")
        time.sleep(min(left, 0.05))
