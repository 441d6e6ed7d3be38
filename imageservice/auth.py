"""Registry credentials and tokens.

- :class:`Credentials` from a CRI ``AuthConfig`` or a containers-auth.json file
  (``{"auths": {"host[/namespace…]": {"auth": base64("user:pass")}}}``; the most
  specific key wins, then legacy ``https://host/v1/`` keys, as containers/image
  looks them up; ``index.docker.io`` and ``registry-1.docker.io`` mean docker.io).
- ``WWW-Authenticate`` challenge parsing (RFC 7235: several challenges in one
  header, quoted values with commas and escapes).
- Bearer-token responses (``token``/``access_token``, ``expires_in`` defaulting
  to 60 s and never below it, ``issued_at``) and a thread-safe token cache keyed
  by registry, repository, scope and the identity that obtained the token, so
  one pod's credentials never serve another's pull.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cri.errors import InvalidArgument

DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
MIN_TOKEN_LIFETIME = 60.0  # seconds: the distribution token spec's default and floor


@dataclass(frozen=True)
class Credentials:
    """What to authenticate with; empty fields mean "not given"."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    @property
    def has_basic(self) -> bool:
        return bool(self.username or self.password)

    def identity(self) -> str:
        """A stable, non-reversible key for caching tokens obtained with these credentials."""
        if self.anonymous:
            return ""
        material = "\0".join(
            (self.username, self.password, self.identity_token, self.registry_token)
        )
        return hashlib.sha256(material.encode()).hexdigest()


def _decode_auth(value: str, where: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            f"invalid auth value in {where}: not base64 of 'user:password'"
        ) from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise InvalidArgument(f"invalid auth value in {where}: decoded value has no ':'")
    return username, password


def credentials_from_auth_config(auth: Any) -> Credentials | None:
    """Credentials from a CRI ``AuthConfig`` message (or None when it carries nothing).

    ``username``/``password`` win over ``auth`` (base64 ``user:pass``), as
    containerd and CRI-O do; identity and registry tokens are kept as given.
    """
    if auth is None:
        return None
    username, password = auth.username, auth.password
    if not username and not password and auth.auth:
        username, password = _decode_auth(auth.auth, "AuthConfig.auth")
    creds = Credentials(
        username=username,
        password=password,
        identity_token=auth.identity_token,
        registry_token=auth.registry_token,
    )
    return None if creds.anonymous else creds


def _normalize_host(host: str) -> str:
    return "docker.io" if host in DOCKER_HUB_ALIASES else host


class AuthFile:
    """A parsed containers-auth.json (or Docker config.json ``auths``) file."""

    def __init__(self, entries: Mapping[str, Credentials]) -> None:
        self._entries = dict(entries)

    @classmethod
    def load(cls, path: Path) -> AuthFile:
        """Read ``path``; a missing file is an empty one, a malformed one InvalidArgument."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls({})
        except OSError as exc:
            raise InvalidArgument(f"cannot read auth file {path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"auth file {path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise InvalidArgument(f"auth file {path}: top level must be a JSON object")
        auths = doc.get("auths", {})
        if not isinstance(auths, dict):
            raise InvalidArgument(f"auth file {path}: 'auths' must be an object")
        exact: dict[str, Credentials] = {}
        legacy: dict[str, Credentials] = {}
        for key, value in auths.items():
            if not isinstance(value, dict):
                raise InvalidArgument(f"auth file {path}: auths[{key!r}] must be an object")
            creds = cls._entry(value, f"{path} auths[{key!r}]")
            if creds is None:
                continue
            stripped = key.removeprefix("https://").removeprefix("http://")
            if stripped != key:  # legacy "https://host/v1/" form: the host only
                legacy.setdefault(_normalize_host(stripped.split("/", 1)[0]), creds)
                continue
            host, sep, rest = stripped.rstrip("/").partition("/")
            exact[_normalize_host(host) + (sep + rest if sep else "")] = creds
        for key, creds in legacy.items():
            exact.setdefault(key, creds)
        return cls(exact)

    @staticmethod
    def _entry(value: Mapping[str, Any], where: str) -> Credentials | None:
        auth, token = value.get("auth", ""), value.get("identitytoken", "")
        if not isinstance(auth, str) or not isinstance(token, str):
            raise InvalidArgument(f"auth file {where}: 'auth' and 'identitytoken' must be strings")
        username, password = _decode_auth(auth, where) if auth else ("", "")
        creds = Credentials(username=username, password=password, identity_token=token)
        return None if creds.anonymous else creds

    def lookup(self, location: str) -> Credentials | None:
        """Credentials for ``host[/path…]`` (a reference name, no tag): most specific key first."""
        host, sep, path = location.partition("/")
        parts = [_normalize_host(host), *(path.split("/") if sep and path else [])]
        for end in range(len(parts), 0, -1):
            creds = self._entries.get("/".join(parts[:end]))
            if creds is not None:
                return creds
        return None


# --- WWW-Authenticate -------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer"
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _read_token(header: str, pos: int) -> tuple[str, int]:
    start = pos
    while pos < len(header) and header[pos] in _TOKEN_CHARS:
        pos += 1
    return header[start:pos], pos


def _skip_spaces(header: str, pos: int) -> int:
    while pos < len(header) and header[pos] in " \t":
        pos += 1
    return pos


def _read_quoted(header: str, pos: int) -> tuple[str, int]:
    out: list[str] = []
    pos += 1  # opening quote
    while pos < len(header):
        ch = header[pos]
        if ch == "\\" and pos + 1 < len(header):
            out.append(header[pos + 1])
            pos += 2
        elif ch == '"':
            return "".join(out), pos + 1
        else:
            out.append(ch)
            pos += 1
    return "".join(out), pos  # unterminated: take what there is


def parse_challenges(header: str) -> list[Challenge]:
    """All challenges in a ``WWW-Authenticate`` value (several may share one header)."""
    challenges: list[Challenge] = []
    pos, n = 0, len(header)
    while pos < n:
        pos = _skip_spaces(header, pos)
        if pos < n and header[pos] == ",":
            pos += 1
            continue
        scheme, pos = _read_token(header, pos)
        if not scheme:
            pos += 1  # junk character: skip it
            continue
        params: dict[str, str] = {}
        while True:
            pos = _skip_spaces(header, pos)
            key, after_key = _read_token(header, pos)
            after_key_sp = _skip_spaces(header, after_key)
            if not key or after_key_sp >= n or header[after_key_sp] != "=":
                break  # next challenge's scheme (or the end)
            pos = _skip_spaces(header, after_key_sp + 1)
            if pos < n and header[pos] == '"':
                value, pos = _read_quoted(header, pos)
            else:
                value, pos = _read_token(header, pos)
            params[key.lower()] = value
            pos = _skip_spaces(header, pos)
            if pos < n and header[pos] == ",":
                pos += 1
            else:
                break
        challenges.append(Challenge(scheme.lower(), params))
    return challenges


# --- bearer tokens ----------------------------------------------------------


@dataclass(frozen=True)
class BearerToken:
    token: str
    expires_at: float  # time.time() seconds
    refresh_token: str = field(default="", repr=False)

    def valid(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires_at


def _parse_issued_at(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_token_response(body: Any, now: float | None = None) -> BearerToken:
    """A token endpoint's JSON answer → BearerToken; ValueError when it has no token.

    The token is considered expired a little early (10% of its lifetime, at
    most 10 s) so a request never goes out with a token about to lapse.
    """
    if not isinstance(body, dict):
        raise ValueError("token response is not a JSON object")
    token = body.get("token") or body.get("access_token")
    if not isinstance(token, str) or not token:
        raise ValueError("token response has no token")
    expires_in = body.get("expires_in")
    lifetime = float(expires_in) if isinstance(expires_in, int | float) else MIN_TOKEN_LIFETIME
    lifetime = max(lifetime, MIN_TOKEN_LIFETIME)
    current = time.time() if now is None else now
    issued = _parse_issued_at(body.get("issued_at"))
    start = min(issued, current) if issued is not None else current
    margin = min(10.0, lifetime * 0.1)
    refresh = body.get("refresh_token")
    return BearerToken(
        token=token,
        expires_at=start + lifetime - margin,
        refresh_token=refresh if isinstance(refresh, str) else "",
    )


@dataclass(frozen=True)
class TokenKey:
    registry: str
    repository: str
    scope: str
    identity: str = ""  # Credentials.identity() of whoever obtained the token


class TokenCache:
    """Bearer tokens by (registry, repository, scope, identity), dropped when expired."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[TokenKey, BearerToken] = {}
        self._max = max_entries

    def get(self, key: TokenKey) -> BearerToken | None:
        with self._lock:
            token = self._tokens.get(key)
            if token is None:
                return None
            if not token.valid():
                del self._tokens[key]
                return None
            return token

    def put(self, key: TokenKey, token: BearerToken) -> None:
        with self._lock:
            if len(self._tokens) >= self._max:
                now = time.time()
                for stale in [k for k, t in self._tokens.items() if not t.valid(now)]:
                    del self._tokens[stale]
                if len(self._tokens) >= self._max:  # still full: forget the oldest
                    del self._tokens[next(iter(self._tokens))]
            self._tokens[key] = token

    def invalidate(self, key: TokenKey) -> None:
        with self._lock:
            self._tokens.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)
