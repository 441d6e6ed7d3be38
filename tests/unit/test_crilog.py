"""The CRI log format parser (pure logic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri.errors import InvalidArgument
from runtimeservice.crilog import (
    LogEntry,
    Stream,
    format_timestamp,
    iter_records,
    parse_line,
    parse_timestamp,
    read_log,
    reassemble,
)

T0 = 1_700_000_000 * 10**9


def test_parse_full_and_partial_lines() -> None:
    rec = parse_line(b"2023-11-14T22:13:20.000000001+00:00 stdout F hello world  \n")
    assert (rec.timestamp_ns, rec.stream, rec.partial) == (T0 + 1, Stream.STDOUT, False)
    assert rec.content == b"hello world  "  # spaces in the content are kept
    rec = parse_line(b"2023-11-14T22:13:20Z stderr P abc")
    assert (rec.timestamp_ns, rec.stream, rec.partial, rec.content) == (
        T0, Stream.STDERR, True, b"abc")


def test_empty_content_and_extra_tags() -> None:
    assert parse_line(b"2023-11-14T22:13:20Z stdout F").content == b""
    assert parse_line(b"2023-11-14T22:13:20Z stdout F ").content == b""
    assert parse_line(b"2023-11-14T22:13:20Z stdout P:x y").partial


@pytest.mark.parametrize("stamp, ns", [
    ("2023-11-14T22:13:20Z", T0),
    ("2023-11-14T22:13:20.5Z", T0 + 500_000_000),
    ("2023-11-14T23:13:20.123456789+01:00", T0 + 123_456_789),
    ("2023-11-14T21:13:20.000001-01:00", T0 + 1000),
])
def test_timestamps(stamp: str, ns: int) -> None:
    assert parse_timestamp(stamp) == ns


def test_format_timestamp_round_trips() -> None:
    assert format_timestamp(T0 + 42) == "2023-11-14T22:13:20.000000042Z"
    assert parse_timestamp(format_timestamp(T0 + 987_654_321)) == T0 + 987_654_321


@pytest.mark.parametrize("line", [
    b"",
    b"garbage",
    b"2023-11-14 stdout F x",
    b"2023-11-14T22:13:20Z stdin F x",
    b"2023-11-14T22:13:20Z stdout X x",
    b"2023-11-14T22:13:20.1234567890Z stdout F x",
])
def test_malformed_lines_are_invalid_argument(line: bytes) -> None:
    with pytest.raises(InvalidArgument):
        parse_line(line)


def test_reassemble_joins_partials_per_stream() -> None:
    data = (
        b"2023-11-14T22:13:20.000000001Z stdout P aaa\n"
        b"2023-11-14T22:13:20.000000002Z stderr F err\n"
        b"2023-11-14T22:13:20.000000003Z stdout P bbb\n"
        b"2023-11-14T22:13:20.000000004Z stdout F ccc\n"
        b"2023-11-14T22:13:20.000000005Z stdout F \n"
        b"2023-11-14T22:13:20.000000006Z stderr P tail"
    )
    assert list(reassemble(iter_records(data))) == [
        LogEntry(T0 + 2, Stream.STDERR, b"err"),
        LogEntry(T0 + 1, Stream.STDOUT, b"aaabbbccc"),
        LogEntry(T0 + 5, Stream.STDOUT, b""),
        LogEntry(T0 + 6, Stream.STDERR, b"tail", complete=False),
    ]


def test_read_log(tmp_path: Path) -> None:
    path = tmp_path / "c.log"
    path.write_bytes(b"2023-11-14T22:13:20+00:00 stdout F caf\xc3\xa9\n")
    (entry,) = read_log(str(path))
    assert entry.text == "café" and entry.stream is Stream.STDOUT
