"""Single-use, expiring tokens that bind a streaming URL to its CRI request."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from api import api_pb2
from cri.errors import ResourceExhausted

Request = api_pb2.ExecRequest | api_pb2.AttachRequest | api_pb2.PortForwardRequest


class Kind(StrEnum):
    """The URL path segment of each streaming endpoint."""

    EXEC = "exec"
    ATTACH = "attach"
    PORT_FORWARD = "portforward"


@dataclass(frozen=True)
class Entry:
    kind: Kind
    request: Request
    expires: float


class TokenCache:
    """Tokens from `insert`, each good for one `consume` before `ttl` runs out.

    At most `max_entries` unexpired tokens exist at once (the kubelet's limit
    is 1000 too): a client that asks for URLs and never uses them cannot grow
    the cache without bound.
    """

    def __init__(self, ttl: float, max_entries: int = 1000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()  # URLs are issued from gRPC handlers

    def insert(self, kind: Kind, request: Request) -> str:
        copy = type(request)()
        copy.MergeFromString(request.SerializeToString())
        with self._lock:
            now = self._clock()
            self._purge(now)
            if len(self._entries) >= self.max_entries:
                raise ResourceExhausted(
                    f"too many pending streaming requests ({len(self._entries)}); "
                    f"try again when some have been used or expired")
            token = secrets.token_urlsafe(24)
            self._entries[token] = Entry(kind, copy, now + self.ttl)
            return token

    def consume(self, token: str) -> Entry | None:
        """The entry of `token`, removed; None when unknown, used or expired."""
        with self._lock:
            entry = self._entries.pop(token, None)
            if entry is None or entry.expires <= self._clock():
                return None
            return entry

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._entries)

    def _purge(self, now: float) -> None:
        # Entries are in insertion order and share one ttl: expired ones lead.
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            del self._entries[token]
