"""The CRI container log format, as conmon writes it and the kubelet reads it.

One record per line: `<RFC3339Nano time> <stdout|stderr> <tags> <content>\\n`,
where tags is `F` (the content ends a line) or `P` (a partial line: the writer
cut a longer line, the next records of the same stream continue it); more tags
may follow, `:`-separated. conmon cuts lines at its 8 KiB read buffer and
writes times with a numeric offset (`2024-01-02T03:04:05.123456789+00:00`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from cri.errors import InvalidArgument


class Stream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True)
class LogRecord:
    """One line of the file."""

    timestamp_ns: int
    stream: Stream
    partial: bool
    content: bytes  # without the record's trailing newline


@dataclass(frozen=True)
class LogEntry:
    """One line the container wrote, reassembled from its records."""

    timestamp_ns: int  # of the first record
    stream: Stream
    content: bytes  # without the newline that ended it
    complete: bool = True  # False when the file ends inside a partial line

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


_TIME = re.compile(
    rb"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$"
)


def parse_timestamp(value: bytes | str) -> int:
    """RFC 3339 with up to nanosecond precision → Unix time in nanoseconds."""
    raw = value.encode() if isinstance(value, str) else value
    m = _TIME.match(raw)
    if m is None:
        raise InvalidArgument(f"invalid CRI log timestamp {raw[:64]!r}")
    zone = m.group(3).decode()
    base = datetime.fromisoformat(m.group(1).decode() + ("+00:00" if zone == "Z" else zone))
    fraction = (m.group(2) or b"").decode().ljust(9, "0")
    return int(base.timestamp()) * 1_000_000_000 + int(fraction)


def format_timestamp(ns: int) -> str:
    """Unix nanoseconds → the UTC form `2024-01-02T03:04:05.123456789Z`."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction:09d}Z"


def parse_line(line: bytes) -> LogRecord:
    """Parse one record (with or without its trailing newline)."""
    if line.endswith(b"\n"):
        line = line[:-1]
    parts = line.split(b" ", 3)
    if len(parts) < 3:
        raise InvalidArgument(f"invalid CRI log line {line[:80]!r}")
    stamp, stream, tags = parts[0], parts[1], parts[2]
    content = parts[3] if len(parts) == 4 else b""
    try:
        which = Stream(stream.decode())
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"invalid CRI log stream {stream[:16]!r}") from None
    tag_list = tags.split(b":")
    if tag_list[0] not in (b"F", b"P"):
        raise InvalidArgument(f"invalid CRI log tag {tags[:16]!r}")
    return LogRecord(parse_timestamp(stamp), which, tag_list[0] == b"P", content)


def iter_records(data: bytes) -> Iterator[LogRecord]:
    """Every record of a log file's contents (a final line without newline included)."""
    for line in data.splitlines():
        if line:
            yield parse_line(line)


def reassemble(records: Iterable[LogRecord]) -> Iterator[LogEntry]:
    """Join partial records into whole lines, separately per stream."""
    pending: dict[Stream, tuple[int, list[bytes]]] = {}
    for rec in records:
        start, parts = pending.pop(rec.stream, (rec.timestamp_ns, []))
        parts.append(rec.content)
        if rec.partial:
            pending[rec.stream] = (start, parts)
        else:
            yield LogEntry(start, rec.stream, b"".join(parts))
    for stream, (start, parts) in pending.items():
        yield LogEntry(start, stream, b"".join(parts), complete=False)


def read_log(path: str) -> list[LogEntry]:
    """The reassembled lines of a CRI log file."""
    with open(path, "rb") as f:
        return list(reassemble(iter_records(f.read())))
