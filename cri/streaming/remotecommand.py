"""The exec/attach protocol (Kubernetes "remotecommand") over SPDY and WebSocket.

Streams. Over SPDY the client opens one stream per role, named by its
``streamtype`` header: ``error`` always, ``stdin``/``stdout``/``stderr`` as
requested, and ``resize`` with a TTY (protocol v3 and later). Each is answered
with a SYN_REPLY at once; the command starts when all expected streams are
there (or the session is dropped after `creation_timeout`). Over WebSocket the
roles are the fixed channels 0-4 and an empty message on the lowest channel we
write to tells the client the connection is ready.

Versions (``X-Stream-Protocol-Version`` for SPDY, the sub-protocol for
WebSocket), as the kubelet implements them:

- ``channel.k8s.io`` (v1): no resize; the server half-closes stdin at once
  and resets the error stream right after set-up, so no status is ever sent;
- ``v2.channel.k8s.io``: the error stream carries the failure message as
  plain text (nothing on success); ``v3.channel.k8s.io`` adds resize;
- ``v4.channel.k8s.io``: the error stream carries a JSON ``metav1.Status``
  (Success, or Failure with reason NonZeroExitCode and the exit code as the
  cause); over SPDY ``v5.channel.k8s.io`` is the same as v4;
- WebSocket ``v5.channel.k8s.io`` adds the client's stdin close signal.

Resize messages are a stream of JSON objects ``{"Width":w,"Height":h}``.
At the end stdout and stderr are half-closed, the status is written and the
error stream closed, and the connection is shut down. If the client goes
away first, the backend call is cancelled.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cri.errors import CribError
from cri.streaming.backend import StreamIO, TerminalSize
from cri.streaming.buffers import shutting_down
from cri.streaming.spdy_session import SessionOptions, SpdySession, SpdyStream
from cri.streaming.websocket import ChannelWebSocket

log = logging.getLogger(__name__)

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
SPDY_PROTOCOLS = (V5, V4, V3, V2, V1)
WEBSOCKET_PROTOCOLS = (V5, V4, "v4.base64.channel.k8s.io", V1, "base64.channel.k8s.io")

STDIN, STDOUT, STDERR, ERROR, RESIZE = "stdin", "stdout", "stderr", "error", "resize"


def supports_resize(version: str) -> bool:
    return version not in (V1, V2)


def json_status(version: str) -> bool:
    return version.startswith(("v4.", "v5."))


class Reader(Protocol):
    async def read(self, n: int = 65536) -> bytes: ...


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class StreamOptions:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


@dataclass
class CommandChannels:
    version: str
    tty: bool
    stdin: Reader | None
    stdout: Writer | None
    stderr: Writer | None
    error: Writer | None
    resize: Reader | None


# ------------------------------------------------------------------ status


def go_json(obj: Any) -> bytes:
    """JSON as Go's encoding/json writes it (compact, HTML characters escaped)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text.encode("utf-8")


@dataclass(frozen=True)
class Status:
    """A metav1.Status: `as_json` for v4+, `message` for the plain-text versions."""

    success: bool
    message: str = ""
    reason: str = ""
    causes: tuple[tuple[str, str], ...] = ()   # (reason, message)
    code: int = 0

    def as_json(self) -> bytes:
        obj: dict[str, Any] = {"metadata": {},
                               "status": "Success" if self.success else "Failure"}
        if self.message:
            obj["message"] = self.message
        if self.reason:
            obj["reason"] = self.reason
        if self.causes:
            obj["details"] = {"causes": [
                {k: v for k, v in (("reason", r), ("message", m)) if v}
                for r, m in self.causes]}
        if self.code:
            obj["code"] = self.code
        return go_json(obj)


SUCCESS = Status(True)


def go_list(items: Sequence[str]) -> str:
    return "[" + " ".join(items) + "]"


def exit_status(code: int, cmd: Sequence[str]) -> Status:
    if code == 0:
        return SUCCESS
    return Status(False,
                  message=f"command terminated with non-zero exit code: error executing "
                          f"command {go_list(cmd)}, exit code {code}",
                  reason="NonZeroExitCode", causes=(("ExitCode", str(code)),))


def internal_error(err: str) -> Status:
    return Status(False, message=f"Internal error occurred: {err}", reason="InternalError",
                  causes=(("", err),), code=500)


async def write_status(channels: CommandChannels, status: Status) -> None:
    if channels.error is None:
        return
    if json_status(channels.version):
        await channels.error.write(status.as_json())
    elif not status.success:
        await channels.error.write(status.message.encode("utf-8"))


# ------------------------------------------------------------------ resize


def _size_field(obj: dict[str, Any], name: str) -> int | None:
    for key, value in obj.items():  # Go matches JSON keys case-insensitively
        if key.lower() == name and isinstance(value, int) and not isinstance(value, bool):
            return value if 0 <= value <= 0xFFFF else None
    return None


async def resize_events(reader: Reader) -> AsyncGenerator[TerminalSize, None]:
    """Terminal sizes from a stream of JSON objects; ends at EOF or garbage."""
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")("replace")
    buf = ""
    while True:
        try:
            chunk = await reader.read(4096)
        except ConnectionError:
            return
        if not chunk:
            return
        buf += text.decode(chunk)
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                obj, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                if len(buf) > 4096:
                    return
                break
            buf = buf[end:]
            if not isinstance(obj, dict):
                return
            width, height = _size_field(obj, "width"), _size_field(obj, "height")
            if width is None or height is None:
                return
            yield TerminalSize(width, height)


# ------------------------------------------------------------------ SPDY streams


class SpdyStreamCollector:
    """The SPDY session's stream handler while an exec/attach sets up."""

    def __init__(self, opts: StreamOptions, version: str) -> None:
        self.opts = opts
        self.version = version
        self.expected = {ERROR}
        for name, wanted in ((STDIN, opts.stdin), (STDOUT, opts.stdout),
                             (STDERR, opts.stderr),
                             (RESIZE, opts.tty and supports_resize(version))):
            if wanted:
                self.expected.add(name)
        self.streams: dict[str, SpdyStream] = {}
        self.complete = asyncio.Event()

    def on_stream(self, stream: SpdyStream) -> None:
        kind = stream.header("streamType") or ""
        if self.complete.is_set() or kind in self.streams or kind not in (
                STDIN, STDOUT, STDERR, ERROR, RESIZE):
            log.debug("refusing %s stream %r", "late" if self.complete.is_set() else
                      "unexpected", kind)
            stream.reset()
            return
        stream.reply()
        if kind not in self.expected:
            stream.discard_input()
            return
        self.streams[kind] = stream
        if kind in (STDOUT, STDERR, ERROR):
            stream.discard_input()
        if set(self.streams) == self.expected:
            self.complete.set()

    async def wait(self, session: SpdySession, timeout: float) -> CommandChannels | None:
        done = asyncio.create_task(self.complete.wait())
        lost = asyncio.create_task(session.closed.wait())
        try:
            await asyncio.wait({done, lost}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            lost.cancel()
        if not self.complete.is_set():
            log.info("client did not create the %s streams in time (got %s)",
                     sorted(self.expected), sorted(self.streams))
            return None
        s = self.streams
        channels = CommandChannels(self.version, self.opts.tty, s.get(STDIN), s.get(STDOUT),
                                   s.get(STDERR), s[ERROR], s.get(RESIZE))
        if self.version == V1:
            # What kubelets of the v1 era did: our side of stdin is closed at
            # once and the error stream is reset, so no status is ever sent.
            if STDIN in s:
                with contextlib.suppress(ConnectionError):
                    await s[STDIN].close()
            s[ERROR].reset()
            channels.error = None
        return channels


# ------------------------------------------------------------------ running


Action = Callable[[StreamIO], Coroutine[Any, Any, int | None]]
OnResult = Callable[[int | None], Status]
OnError = Callable[[str], str]


async def run_command(channels: CommandChannels, action: Action,
                      on_result: OnResult,
                      on_error: OnError, disconnected: asyncio.Event) -> None:
    """Run `action` with the channels; write the status it ends with.

    `on_result` maps the action's result (an exit code, or None for attach)
    to a status; `on_error` words a failure. If `disconnected` fires first,
    the action is cancelled and nothing more is written.
    """
    resize = (resize_events(channels.resize)
              if channels.tty and channels.resize is not None else None)
    io = StreamIO(channels.stdin, channels.stdout, channels.stderr, channels.tty, resize)
    task: asyncio.Task[int | None] = asyncio.create_task(action(io))
    lost = asyncio.create_task(disconnected.wait())
    try:
        await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        lost.cancel()
        if not task.done():
            log.info("client went away; cancelling the command")
            task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if resize is not None:
            await resize.aclose()
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        status = on_result(task.result())
    elif isinstance(exc, CribError):
        status = internal_error(on_error(exc.message))
    elif isinstance(exc, ConnectionError):
        log.info("stream to the client broke: %s", exc)
        return
    else:
        log.error("streaming command failed", exc_info=exc)
        status = internal_error(on_error(f"{type(exc).__name__}: {exc}"))
    with contextlib.suppress(ConnectionError):
        for out in (channels.stdout, channels.stderr):
            if out is not None:
                await out.close()
        await write_status(channels, status)
        if channels.error is not None:
            await channels.error.close()


# ------------------------------------------------------------------ per transport


async def websocket_channels(ws: ChannelWebSocket, opts: StreamOptions) -> CommandChannels:
    """Open channels 0-4 on an accepted WebSocket and signal readiness."""
    stdin, stdout, stderr, error, resize = ws.open_channels(
        [(opts.stdin, False), (False, opts.stdout), (False, opts.stderr), (False, True),
         (True, False)])
    name = ws.protocol.name
    version = V5 if name == V5 else V4 if name.startswith("v4.") else V2
    if not opts.tty:
        resize.inbound.discard()
    # An empty message on the lowest channel we write to: "streams are ready".
    ready = stdout if opts.stdout else stderr if opts.stderr else error
    await ws.send_channel(ready.number, b"")
    return CommandChannels(version, opts.tty, stdin if opts.stdin else None,
                           stdout if opts.stdout else None, stderr if opts.stderr else None,
                           error, resize)


async def serve_spdy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     leftover: bytes, version: str, opts: StreamOptions, action: Action,
                     on_result: OnResult,
                     on_error: OnError, creation_timeout: float,
                     session_options: SessionOptions | None = None) -> None:
    """An exec/attach over an upgraded SPDY connection, start to finish."""
    collector = SpdyStreamCollector(opts, version)
    session = SpdySession(reader, writer, collector.on_stream, session_options, leftover)
    session.start()
    try:
        channels = await collector.wait(session, creation_timeout)
        if channels is not None:
            await run_command(channels, action, on_result, on_error, session.closed)
    finally:
        await session.close(linger=0 if shutting_down() else None)


async def serve_websocket(ws: ChannelWebSocket, opts: StreamOptions, action: Action,
                          on_result: OnResult,
                          on_error: OnError) -> None:
    """An exec/attach over an accepted WebSocket, start to finish."""
    try:
        channels = await websocket_channels(ws, opts)
        await run_command(channels, action, on_result, on_error, ws.closed)
    except ConnectionError as exc:
        log.info("WebSocket client went away: %s", exc)
    finally:
        await ws.close(linger=0 if shutting_down() else None)
