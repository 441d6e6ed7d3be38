"""Send an HTTP/1.1 upgrade request and read the response head."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Upgraded:
    status: int
    headers: dict[str, list[str]]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    leftover: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


async def upgrade(url: str, headers: list[tuple[str, str]], method: str = "POST",
                  ssl: object = None) -> Upgraded:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl)  # type: ignore[arg-type]
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}",
             *(f"{k}: {v}" for k, v in headers)]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"connection closed before a response; got {raw!r}")
        raw += chunk
    head, leftover = raw.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    parsed: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.setdefault(name.strip().lower(), []).append(value.strip())
    body = b""
    if status != 101:
        body = leftover + await reader.read()
        leftover = b""
        writer.close()
    return Upgraded(status, parsed, body, reader, writer, leftover)
