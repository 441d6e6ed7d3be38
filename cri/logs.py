"""Logging: one line per event, carrying the request id and RPC name."""

from __future__ import annotations

import contextvars
import logging
import sys

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
RPC_NAME: contextvars.ContextVar[str] = contextvars.ContextVar("rpc_name", default="-")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.rpc = RPC_NAME.get()
        return True


FORMAT = "%(asctime)s %(levelname)s [%(request_id)s %(rpc)s] %(name)s: %(message)s"


def setup(level: str) -> None:
    """Configure the root logger once (idempotent: re-running only changes the level)."""
    root = logging.getLogger()
    if not any(getattr(h, "_crib", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_ContextFilter())
        handler._crib = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc and urllib3 are chatty at DEBUG; keep them at WARNING unless asked.
    for noisy in ("urllib3", "grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
