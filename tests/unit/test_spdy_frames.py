"""SPDY/3.1 framing: byte-level vectors from the specification's frame layouts,
and header blocks checked against an independent zlib context (the test
client's), including the one-context-per-direction rule."""

from __future__ import annotations

import zlib

import pytest

from cri.streaming import spdy
from tests.streamclient import spdy_client
from tests.streamclient.spdy_dictionary import SPDY3_DICTIONARY


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def decode_one(data: bytes) -> spdy.Frame:
    d = spdy.Decoder()
    d.feed(data)
    frames = list(d.frames())
    assert len(frames) == 1 and d.buffered == 0
    return frames[0]


def test_dictionary_matches_the_specification_table() -> None:
    assert spdy.HEADER_DICTIONARY == SPDY3_DICTIONARY
    assert len(spdy.HEADER_DICTIONARY) == 1423
    assert spdy.HEADER_DICTIONARY.startswith(h("00000007") + b"options" + h("00000004") + b"head")
    assert spdy.HEADER_DICTIONARY.endswith(b",*,enq=0.")


@pytest.mark.parametrize(("frame", "wire"), [
    # DATA: |0|stream-id| flags(FIN) length | payload
    (spdy.DataFrame(1, b"hi", fin=True), "00000001" "01000002" "6869"),
    (spdy.DataFrame(0x7FFFFFFF, b""), "7fffffff" "00000000"),
    # control frames: |1|version=3|type| flags length | payload
    (spdy.RstStream(3, spdy.RstStatus.CANCEL), "80030003" "00000008" "00000003" "00000005"),
    (spdy.Ping(1), "80030006" "00000004" "00000001"),
    (spdy.GoAway(5, spdy.GoAwayStatus.OK), "80030007" "00000008" "00000005" "00000000"),
    (spdy.WindowUpdate(0, 0x7FFFFFFF), "80030009" "00000008" "00000000" "7fffffff"),
    (spdy.WindowUpdate(7, 1024), "80030009" "00000008" "00000007" "00000400"),
    # SETTINGS: count, then flags(8) id(24) value(32)
    (spdy.Settings((spdy.Setting(spdy.SettingId.INITIAL_WINDOW_SIZE, 4096),)),
     "80030004" "0000000c" "00000001" "00000007" "00001000"),
    (spdy.Settings((spdy.Setting(4, 100, flags=1),), clear=True),
     "80030004" "0100000c" "00000001" "01000004" "00000064"),
])
def test_fixed_frames_encode_and_decode(frame: spdy.Frame, wire: str) -> None:
    assert spdy.Encoder().encode(frame) == h(wire)
    assert decode_one(h(wire)) == frame


def test_header_block_layout() -> None:
    block = spdy.pack_header_block({"streamType": "error", "port": "80"})
    assert block == (h("00000002") + h("0000000a") + b"streamtype" + h("00000005") + b"error"
                     + h("00000004") + b"port" + h("00000002") + b"80")
    assert spdy.unpack_header_block(block) == {"streamtype": "error", "port": "80"}
    assert spdy.unpack_header_block(h("00000000")) == {}


def test_syn_reply_is_readable_by_an_independent_inflater() -> None:
    wire = spdy.Encoder().encode(spdy.SynReply(1, {}))
    assert wire[:4] == h("80030002") and wire[4] == 0           # type 2, no flags
    assert int.from_bytes(wire[5:8], "big") == len(wire) - 8
    assert wire[8:12] == h("00000001")
    zblock = wire[12:]
    # zlib header with FDICT and the dictionary's Adler-32, as SPDY requires
    assert zblock[0] == 0x78 and zblock[1] & 0x20
    assert zblock[2:6] == zlib.adler32(SPDY3_DICTIONARY).to_bytes(4, "big")
    inflater = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
    assert inflater.decompress(zblock) == h("00000000")


def test_one_compression_context_per_direction() -> None:
    enc = spdy.Encoder()
    first = enc.encode(spdy.SynReply(1, {"a": "b"}))
    second = enc.encode(spdy.SynReply(3, {"a": "b"}))
    inflater = zlib.decompressobj(zdict=SPDY3_DICTIONARY)
    assert spdy_client._parse_nv(inflater.decompress(first[12:])) == {"a": "b"}
    assert spdy_client._parse_nv(inflater.decompress(second[12:])) == {"a": "b"}
    # the second block refers back into the shared window: alone it is no zlib stream
    with pytest.raises(zlib.error):
        zlib.decompressobj(zdict=SPDY3_DICTIONARY).decompress(second[12:])


def client_syn_streams(*headers: dict[str, str]) -> list[bytes]:
    """SYN_STREAM frames as the independent client encodes them (one context)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, zdict=SPDY3_DICTIONARY)
    out = []
    for i, hd in enumerate(headers):
        block = deflate.compress(spdy_client._nv_block(hd)) + deflate.flush(zlib.Z_SYNC_FLUSH)
        body = (2 * i + 1).to_bytes(4, "big") + h("00000000") + bytes([0x60, 0]) + block
        out.append(h("80030001") + (0x01000000 | len(body)).to_bytes(4, "big") + body)
    return out


def test_decoder_reads_client_syn_streams_byte_by_byte() -> None:
    wires = client_syn_streams({"streamType": "error"}, {"streamType": "stdin"},
                               {"streamType": "data", "port": "8080", "requestID": "0"})
    d = spdy.Decoder()
    frames = []
    for byte in b"".join(wires):
        d.feed(bytes([byte]))
        frames.extend(d.frames())
    assert frames == [
        spdy.SynStream(1, {"streamtype": "error"}, priority=3, fin=True),
        spdy.SynStream(3, {"streamtype": "stdin"}, priority=3, fin=True),
        spdy.SynStream(5, {"streamtype": "data", "port": "8080", "requestid": "0"},
                       priority=3, fin=True),
    ]


def test_round_trip_of_every_frame_type() -> None:
    frames: list[spdy.Frame] = [
        spdy.SynStream(1, {"x": "1\x002"}, associated_to=0, priority=7, slot=2,
                       unidirectional=True),
        spdy.SynReply(1, {"status": "200"}, fin=True),
        spdy.Headers(1, {"k": "v"}),
        spdy.DataFrame(1, b"\x00" * 70000),
        spdy.RstStream(1, spdy.RstStatus.FLOW_CONTROL_ERROR),
        spdy.Settings(), spdy.Ping(2), spdy.GoAway(1, spdy.GoAwayStatus.INTERNAL_ERROR),
        spdy.WindowUpdate(1, 5),
    ]
    enc, dec = spdy.Encoder(), spdy.Decoder()
    dec.feed(b"".join(enc.encode(f) for f in frames))
    assert list(dec.frames()) == frames


def test_unknown_control_frames_are_skipped() -> None:
    d = spdy.Decoder()
    d.feed(h("8003000a" "00000002" "abcd") + spdy.Encoder().encode(spdy.Ping(3)))
    assert list(d.frames()) == [spdy.Ping(3)]


@pytest.mark.parametrize(("wire", "words"), [
    ("80020006" "00000004" "00000001", "unsupported SPDY version 2"),
    ("80030006" "00000005" "0000000100", "PING frame has length 5"),
    ("80030009" "00000004" "00000001", "WINDOW_UPDATE frame has length 4"),
    ("00000000" "00000001" "00", "data frame on stream 0"),
    ("80030004" "00000008" "00000002" "00000000", "SETTINGS frame with 2 entries"),
    ("80030002" "00000006" "00000001" "ffff", "cannot decompress"),
])
def test_session_errors(wire: str, words: str) -> None:
    d = spdy.Decoder()
    d.feed(h(wire))
    with pytest.raises(spdy.SpdyProtocolError, match=words) as info:
        list(d.frames())
    assert info.value.stream_id == 0


@pytest.mark.parametrize(("block", "words"), [
    (h("00000001") + h("00000001") + b"A" + h("00000001") + b"b", "not lower case"),
    (h("00000002") + (h("00000001") + b"a" + h("00000001") + b"b") * 2, "duplicate header"),
    (h("00000001") + h("00000000") + h("00000000"), "empty header name"),
    (h("00000001") + h("00000009") + b"a", "truncated"),
])
def test_bad_header_blocks_are_stream_errors(block: bytes, words: str) -> None:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, zdict=SPDY3_DICTIONARY)
    z = deflate.compress(block) + deflate.flush(zlib.Z_SYNC_FLUSH)
    body = h("00000003" "00000000" "0000") + z
    d = spdy.Decoder()
    d.feed(h("80030001") + len(body).to_bytes(4, "big") + body + spdy.encode_data(3, b"x"))
    with pytest.raises(spdy.SpdyProtocolError, match=words) as info:
        d.next_frame()
    assert info.value.stream_id == 3
    assert d.next_frame() == spdy.DataFrame(3, b"x")  # the session goes on


def test_oversized_data_frames_are_refused_before_buffering() -> None:
    d = spdy.Decoder(max_data_length=1024)
    d.feed(h("00000001" "00000401"))
    with pytest.raises(spdy.SpdyProtocolError, match="too large"):
        d.next_frame()
