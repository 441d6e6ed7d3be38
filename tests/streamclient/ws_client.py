"""A minimal RFC 6455 WebSocket client (masked frames, fragmentation, ping/pong,
close handshake) and the Kubernetes channel framing on top of it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os

from tests.streamclient.http_upgrade import Upgraded, upgrade

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeFailed(Exception):
    def __init__(self, response: Upgraded) -> None:
        super().__init__(f"WebSocket upgrade refused: {response.status} {response.body!r}")
        self.response = response


class WsClient:
    def __init__(self, up: Upgraded) -> None:
        self.reader, self.writer = up.reader, up.writer
        self.pending = up.leftover
        self.subprotocol = up.header("sec-websocket-protocol") or ""
        self.close_code: int | None = None
        self.pongs: list[bytes] = []

    @classmethod
    async def connect(cls, url: str, protocols: list[str], method: str = "GET",
                      extra: list[tuple[str, str]] | None = None) -> WsClient:
        key = base64.b64encode(os.urandom(16)).decode()
        headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13"),
                   *(extra or [])]
        if protocols:
            headers.append(("Sec-WebSocket-Protocol", ", ".join(protocols)))
        up = await upgrade(url, headers, method=method)
        if up.status != 101:
            raise HandshakeFailed(up)
        expect = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if up.header("sec-websocket-accept") != expect:
            raise ValueError(f"bad Sec-WebSocket-Accept {up.header('sec-websocket-accept')!r}")
        return cls(up)

    # ---- frames

    async def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        head = bytearray([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head.append(0x80 | 126)
            head += n.to_bytes(2, "big")
        else:
            head.append(0x80 | 127)
            head += n.to_bytes(8, "big")
        mask = os.urandom(4)
        head += mask
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else \
            _xor(payload, mask)
        self.writer.write(bytes(head) + masked)
        await self.writer.drain()

    async def _exactly(self, n: int) -> bytes:
        if len(self.pending) >= n:
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        out, self.pending = self.pending, b""
        return out + await self.reader.readexactly(n - len(out))

    async def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self._exactly(2)
        if b1 & 0x80:
            raise ValueError("the server masked a frame")
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self._exactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self._exactly(8), "big")
        return bool(b0 & 0x80), b0 & 0x0F, await self._exactly(n)

    async def recv(self) -> tuple[int, bytes] | None:
        """The next whole message (opcode, payload); None once closed."""
        parts: list[bytes] = []
        opcode = None
        while True:
            try:
                fin, op, payload = await self._frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if op == PING:
                await self.send_frame(PONG, payload)
                continue
            if op == PONG:
                self.pongs.append(payload)
                continue
            if op == CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                with contextlib.suppress(ConnectionError):
                    await self.send_frame(CLOSE, payload[:2])
                return None
            if op != CONT:
                opcode = op
            parts.append(payload)
            if fin:
                assert opcode is not None
                return opcode, b"".join(parts)

    async def close(self, code: int = 1000) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send_frame(CLOSE, code.to_bytes(2, "big"))
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    def abort(self) -> None:
        self.writer.transport.abort()

    # ---- Kubernetes channels

    @property
    def base64(self) -> bool:
        return "base64." in self.subprotocol

    async def send_channel(self, channel: int, data: bytes) -> None:
        if self.base64:
            await self.send_frame(TEXT, str(channel).encode() + base64.b64encode(data))
        else:
            await self.send_frame(BINARY, bytes([channel]) + data)

    async def recv_channel(self) -> tuple[int, bytes] | None:
        msg = await self.recv()
        if msg is None:
            return None
        _, payload = msg
        if self.base64:
            return payload[0] - ord("0"), base64.b64decode(payload[1:])
        return payload[0], payload[1:]


def _xor(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")
