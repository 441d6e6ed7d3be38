"""SPDY/3.1 framing: frame records, their wire encoding, and header-block compression.

Pure and synchronous: an `Encoder` turns frames into bytes, a `Decoder` is fed
bytes and yields frames. Each owns the zlib context of its direction: SPDY/3
compresses every name/value header block of a session with ONE deflate stream
per direction, primed with the dictionary of the specification (section
2.6.10.1 of draft-mbelshe-httpbis-spdy-00) and sync-flushed after each block,
so a block can be decoded as soon as its frame has arrived.

Wire layout (all integers big-endian)::

    control frame: |1| version:15 | type:16 | flags:8 | length:24 | payload
    data frame:    |0| stream-id:31         | flags:8 | length:24 | payload

    header block (before compression):
        count:32, then count times: name-length:32 name value-length:32 value
    (names are lower case; several values of one name are joined by NUL)

SPDY/3.1 differs from SPDY/3 only by session-level flow control
(WINDOW_UPDATE on stream 0) and by dropping CREDENTIAL; the version field is 3.
Control frame types this module does not know are skipped, as the
specification requires; the session layer (`spdy_session`) owns the stream
state machine and flow control.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

SPDY_VERSION = 3
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 0x7FFFFFFF
MAX_FRAME_LENGTH = 0xFFFFFF
# A decompressed header block larger than this is refused (a compression bomb).
MAX_HEADER_BLOCK = 256 * 1024

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_CLEAR_SETTINGS = 0x01


class FrameType(IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingId(IntEnum):
    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


class SpdyProtocolError(Exception):
    """The peer broke the framing rules; `stream_id` is 0 for session errors."""

    def __init__(self, message: str, stream_id: int = 0,
                 status: RstStatus = RstStatus.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.status = status


# ------------------------------------------------------------------ dictionary

# The SPDY/3 dictionary is a run of length-prefixed words followed by a block
# of plain text; it is spelled here the way the specification builds it.
_DICT_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range",
    "referer", "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade",
    "user-agent", "vary", "via", "warning", "www-authenticate", "method", "get", "status",
    "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)
_DICT_TEXT = (
    "100101201202205206300302303304305306307"
    "402405406407408409410411412413414415416417"
    "502504505"
    "203 Non-Authoritative Information"
    "204 No Content"
    "301 Moved Permanently"
    "400 Bad Request"
    "401 Unauthorized"
    "403 Forbidden"
    "404 Not Found"
    "500 Internal Server Error"
    "501 Not Implemented"
    "503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec "
    "00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,public"
    "privatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = b"".join(
    struct.pack(">I", len(w)) + w.encode("ascii") for w in _DICT_WORDS
) + _DICT_TEXT.encode("ascii")


# ------------------------------------------------------------------ frames


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes = b""
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Mapping[str, str] = field(default_factory=dict)
    associated_to: int = 0
    priority: int = 0
    slot: int = 0
    fin: bool = False
    unidirectional: bool = False


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Mapping[str, str] = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Setting:
    id: int
    value: int
    flags: int = 0


@dataclass(frozen=True)
class Settings:
    entries: tuple[Setting, ...] = ()
    clear: bool = False

    def get(self, setting: SettingId) -> int | None:
        for e in self.entries:
            if e.id == setting:
                return e.value
        return None


@dataclass(frozen=True)
class Ping:
    id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True)
class Headers:
    stream_id: int
    headers: Mapping[str, str] = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


Frame = (DataFrame | SynStream | SynReply | RstStream | Settings | Ping | GoAway
         | Headers | WindowUpdate)


# ------------------------------------------------------------------ header blocks


def pack_header_block(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """The uncompressed name/value block; names are lower-cased."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    out = [struct.pack(">I", len(pairs))]
    for name, value in pairs:
        n = name.lower().encode("utf-8")
        v = value.encode("utf-8")
        out.append(struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def unpack_header_block(block: bytes, stream_id: int = 0) -> dict[str, str]:
    """Parse an uncompressed name/value block (multi-values stay NUL-joined)."""
    def fail(why: str) -> SpdyProtocolError:
        return SpdyProtocolError(f"malformed header block on stream {stream_id}: {why}",
                                 stream_id)

    if len(block) < 4:
        raise fail("shorter than its count")
    (count,) = struct.unpack_from(">I", block, 0)
    pos = 4
    headers: dict[str, str] = {}
    for _ in range(count):
        fields = []
        for _part in ("name", "value"):
            if pos + 4 > len(block):
                raise fail("truncated length")
            (size,) = struct.unpack_from(">I", block, pos)
            pos += 4
            if pos + size > len(block):
                raise fail("truncated string")
            fields.append(block[pos:pos + size].decode("utf-8", "replace"))
            pos += size
        name, value = fields
        if not name:
            raise fail("empty header name")
        if name != name.lower():
            raise fail(f"header name {name!r} is not lower case")
        if name in headers:
            raise fail(f"duplicate header {name!r}")
        headers[name] = value
    if pos != len(block):
        raise fail(f"{len(block) - pos} trailing bytes")
    return headers


class HeaderCompressor:
    """The sending direction's single deflate context."""

    def __init__(self) -> None:
        self._z = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, 8,
                                   zlib.Z_DEFAULT_STRATEGY, zdict=HEADER_DICTIONARY)

    def compress(self, headers: Mapping[str, str]) -> bytes:
        block = pack_header_block(headers)
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The receiving direction's single inflate context."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(15, zdict=HEADER_DICTIONARY)

    def decompress(self, data: bytes, stream_id: int = 0) -> dict[str, str]:
        try:
            block = self._z.decompress(data, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            # The shared context is now unusable: a session error.
            raise SpdyProtocolError(f"cannot decompress the header block of stream "
                                    f"{stream_id}: {exc}") from None
        if self._z.unconsumed_tail:
            raise SpdyProtocolError(f"the header block of stream {stream_id} is larger "
                                    f"than {MAX_HEADER_BLOCK} bytes")
        return unpack_header_block(block, stream_id)


# ------------------------------------------------------------------ encoding


def _control(ftype: FrameType, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_LENGTH:
        raise ValueError(f"control frame payload of {len(payload)} bytes is too large")
    return struct.pack(">HHI", 0x8000 | SPDY_VERSION, ftype,
                       (flags << 24) | len(payload)) + payload


def encode_data(stream_id: int, data: bytes = b"", fin: bool = False) -> bytes:
    """A DATA frame (the hot path, so it does not go through a record)."""
    if len(data) > MAX_FRAME_LENGTH:
        raise ValueError(f"data frame payload of {len(data)} bytes is too large")
    return struct.pack(">II", stream_id & 0x7FFFFFFF,
                       ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


class Encoder:
    """Frames to bytes for one direction of a session (owns its compressor)."""

    def __init__(self) -> None:
        self._headers = HeaderCompressor()

    def encode(self, frame: Frame) -> bytes:
        f = frame
        if isinstance(f, DataFrame):
            return encode_data(f.stream_id, f.data, f.fin)
        if isinstance(f, SynStream):
            flags = (FLAG_FIN if f.fin else 0) | (FLAG_UNIDIRECTIONAL if f.unidirectional else 0)
            body = struct.pack(">IIBB", f.stream_id & 0x7FFFFFFF, f.associated_to & 0x7FFFFFFF,
                               (f.priority & 0x7) << 5, f.slot)
            return _control(FrameType.SYN_STREAM, flags, body + self._headers.compress(f.headers))
        if isinstance(f, SynReply | Headers):
            ftype = FrameType.SYN_REPLY if isinstance(f, SynReply) else FrameType.HEADERS
            body = struct.pack(">I", f.stream_id & 0x7FFFFFFF)
            return _control(ftype, FLAG_FIN if f.fin else 0,
                            body + self._headers.compress(f.headers))
        if isinstance(f, RstStream):
            return _control(FrameType.RST_STREAM, 0,
                            struct.pack(">II", f.stream_id & 0x7FFFFFFF, f.status))
        if isinstance(f, Settings):
            body = struct.pack(">I", len(f.entries)) + b"".join(
                struct.pack(">II", (e.flags << 24) | (e.id & 0xFFFFFF), e.value)
                for e in f.entries)
            return _control(FrameType.SETTINGS, FLAG_CLEAR_SETTINGS if f.clear else 0, body)
        if isinstance(f, Ping):
            return _control(FrameType.PING, 0, struct.pack(">I", f.id))
        if isinstance(f, GoAway):
            return _control(FrameType.GOAWAY, 0,
                            struct.pack(">II", f.last_good_stream_id & 0x7FFFFFFF, f.status))
        if isinstance(f, WindowUpdate):
            return _control(FrameType.WINDOW_UPDATE, 0,
                            struct.pack(">II", f.stream_id & 0x7FFFFFFF, f.delta & 0x7FFFFFFF))
        raise TypeError(f"not a SPDY frame: {frame!r}")


# ------------------------------------------------------------------ decoding

_FIXED_LENGTH = {
    FrameType.RST_STREAM: 8,
    FrameType.PING: 4,
    FrameType.GOAWAY: 8,
    FrameType.WINDOW_UPDATE: 8,
}


class Decoder:
    """Bytes to frames for one direction of a session (owns its decompressor).

    `feed` appends received bytes; iterating `frames()` yields every complete
    frame. A `SpdyProtocolError` with a non-zero `stream_id` concerns that
    stream only (the frame was consumed and decoding may go on); with 0 the
    session is broken.
    """

    def __init__(self, max_data_length: int = MAX_FRAME_LENGTH) -> None:
        self._buf = bytearray()
        self._headers = HeaderDecompressor()
        self._max_data = max_data_length

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def frames(self) -> Iterator[Frame]:
        while True:
            frame = self.next_frame()
            if frame is None:
                return
            yield frame

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed."""
        while len(self._buf) >= 8:
            word, flags_len = struct.unpack_from(">II", self._buf, 0)
            flags, length = flags_len >> 24, flags_len & 0xFFFFFF
            if not word & 0x80000000 and length > self._max_data:
                raise SpdyProtocolError(f"data frame of {length} bytes is too large")
            if len(self._buf) < 8 + length:
                return None
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            if not word & 0x80000000:
                stream_id = word & 0x7FFFFFFF
                if stream_id == 0:
                    raise SpdyProtocolError("data frame on stream 0")
                return DataFrame(stream_id, payload, bool(flags & FLAG_FIN))
            version, ftype = (word >> 16) & 0x7FFF, word & 0xFFFF
            if version != SPDY_VERSION:
                raise SpdyProtocolError(f"unsupported SPDY version {version}", 0,
                                        RstStatus.UNSUPPORTED_VERSION)
            try:
                known = FrameType(ftype)
            except ValueError:
                continue  # unknown control frames are ignored
            return self._control(known, flags, payload)
        return None

    def _control(self, ftype: FrameType, flags: int, p: bytes) -> Frame:
        want = _FIXED_LENGTH.get(ftype)
        if want is not None and len(p) != want:
            raise SpdyProtocolError(f"{ftype.name} frame has length {len(p)}, not {want}")
        if ftype is FrameType.SYN_STREAM:
            if len(p) < 10:
                raise SpdyProtocolError("SYN_STREAM frame too short")
            sid, assoc, pri, slot = struct.unpack_from(">IIBB", p, 0)
            sid &= 0x7FFFFFFF
            headers = self._headers.decompress(p[10:], sid)
            if sid == 0:
                raise SpdyProtocolError("SYN_STREAM for stream 0")
            return SynStream(sid, headers, assoc & 0x7FFFFFFF, pri >> 5, slot,
                             bool(flags & FLAG_FIN), bool(flags & FLAG_UNIDIRECTIONAL))
        if ftype in (FrameType.SYN_REPLY, FrameType.HEADERS):
            if len(p) < 4:
                raise SpdyProtocolError(f"{ftype.name} frame too short")
            sid = struct.unpack_from(">I", p, 0)[0] & 0x7FFFFFFF
            headers = self._headers.decompress(p[4:], sid)
            if sid == 0:
                raise SpdyProtocolError(f"{ftype.name} for stream 0")
            if ftype is FrameType.SYN_REPLY:
                return SynReply(sid, headers, bool(flags & FLAG_FIN))
            return Headers(sid, headers, bool(flags & FLAG_FIN))
        if ftype is FrameType.RST_STREAM:
            sid, status = struct.unpack(">II", p)
            return RstStream(sid & 0x7FFFFFFF, status)
        if ftype is FrameType.SETTINGS:
            if len(p) < 4:
                raise SpdyProtocolError("SETTINGS frame too short")
            (count,) = struct.unpack_from(">I", p, 0)
            if len(p) != 4 + 8 * count:
                raise SpdyProtocolError(f"SETTINGS frame with {count} entries has length {len(p)}")
            entries = []
            for i in range(count):
                fid, value = struct.unpack_from(">II", p, 4 + 8 * i)
                entries.append(Setting(fid & 0xFFFFFF, value, fid >> 24))
            return Settings(tuple(entries), bool(flags & FLAG_CLEAR_SETTINGS))
        if ftype is FrameType.PING:
            return Ping(struct.unpack(">I", p)[0])
        if ftype is FrameType.GOAWAY:
            last, status = struct.unpack(">II", p)
            return GoAway(last & 0x7FFFFFFF, status)
        # WINDOW_UPDATE
        sid, delta = struct.unpack(">II", p)
        return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
