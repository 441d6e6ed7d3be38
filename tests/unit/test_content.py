"""ContentStore: verified, atomic ingest; digests; leases; housekeeping."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from cri.errors import FailedPrecondition, InvalidArgument, NotFound
from imageservice.content import ContentMismatch, ContentStore, parse_digest, sha256_digest


def dg(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def visible(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.blob_dir))


def leftovers(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.tmp_dir))


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "images")


def test_ingest_streams_verifies_and_commits(store: ContentStore) -> None:
    data = os.urandom(3 << 20)
    with store.ingest(dg(data), len(data)) as ing:
        for i in range(0, len(data), 65536):
            ing.write(memoryview(data)[i : i + 65536])
        assert ing.written == len(data)
        assert visible(store) == []  # nothing shows before commit
        path = ing.commit()
    assert path == store.path(dg(data))
    assert store.has(dg(data))
    assert store.read_bytes(dg(data)) == data
    assert store.size(dg(data)) == len(data)
    with store.open(dg(data)) as fh:
        assert fh.read(10) == data[:10]
    assert leftovers(store) == []
    assert store.digests() == [dg(data)]


def test_unknown_size_is_allowed(store: ContentStore) -> None:
    with store.ingest(dg(b"abc")) as ing:
        ing.write(b"abc")
        ing.commit()
    assert store.has(dg(b"abc"))


@pytest.mark.parametrize(
    ("payload", "size", "match"),
    [
        (b"tampered", 8, "content has digest"),
        (b"short", 10, "size 5 bytes, expected 10"),
    ],
)
def test_failed_commit_leaves_nothing(
    store: ContentStore, payload: bytes, size: int, match: str
) -> None:
    want = dg(b"the real thing")
    with store.ingest(want, size) as ing:
        ing.write(payload)
        with pytest.raises(ContentMismatch, match=match):
            ing.commit()
    assert visible(store) == [] and leftovers(store) == []
    assert not store.has(want)


def test_oversized_stream_fails_at_once(store: ContentStore) -> None:
    ing = store.ingest(dg(b"1234"), 4)
    ing.write(b"12")
    with pytest.raises(ContentMismatch, match="more than the expected 4"):
        ing.write(b"345")
    assert ing.closed
    assert leftovers(store) == []
    with pytest.raises(FailedPrecondition):
        ing.write(b"x")


def test_exception_inside_the_block_aborts(store: ContentStore) -> None:
    with pytest.raises(ConnectionError), store.ingest(dg(b"data"), 4) as ing:
        ing.write(b"da")
        raise ConnectionError("registry hung up")
    assert visible(store) == [] and leftovers(store) == []


def test_abort_is_idempotent_and_commit_after_abort_fails(store: ContentStore) -> None:
    ing = store.ingest(dg(b"x"), 1)
    ing.abort()
    ing.abort()
    with pytest.raises(FailedPrecondition, match="already committed or aborted"):
        ing.commit()
    assert leftovers(store) == []


def test_concurrent_ingests_of_one_blob(store: ContentStore) -> None:
    data = os.urandom(1 << 20)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with store.ingest(dg(data), len(data)) as ing:
                ing.write(data)
                ing.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert visible(store) == [dg(data)[7:]] and leftovers(store) == []
    assert store.read_bytes(dg(data)) == data


def test_write_bytes(store: ContentStore) -> None:
    manifest = b'{"schemaVersion": 2}'
    store.write_bytes(dg(manifest), manifest)
    store.write_bytes(dg(manifest), manifest)  # present already: fine
    assert store.read_bytes(dg(manifest)) == manifest
    with pytest.raises(ContentMismatch):
        store.write_bytes(dg(manifest), b"other")  # present, but this is not its content
    with pytest.raises(ContentMismatch):
        store.write_bytes(dg(b"config"), b"not the config")
    assert visible(store) == [dg(manifest)[7:]] and leftovers(store) == []
    asyncio.run(store.write_bytes_async(dg(b"cfg"), b"cfg"))
    assert store.has(dg(b"cfg"))


@pytest.mark.parametrize(
    "bad",
    [
        "sha512:" + "a" * 128,
        "md5:" + "a" * 32,
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "a" * 64,
        "sha256:../../../../etc/passwd",
        "",
    ],
)
def test_digests_are_validated(store: ContentStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_digest(bad)
    with pytest.raises(InvalidArgument):
        store.ingest(bad)
    with pytest.raises(InvalidArgument):
        store.has(bad)
    with pytest.raises(InvalidArgument):
        store.delete(bad)


def test_sha512_is_named_in_the_error() -> None:
    with pytest.raises(InvalidArgument, match="'sha512'"):
        parse_digest("sha512:" + "a" * 128)


def test_missing_blob(store: ContentStore) -> None:
    missing = dg(b"nope")
    assert not store.has(missing)
    with pytest.raises(NotFound, match=missing):
        store.open(missing)
    with pytest.raises(NotFound):
        store.size(missing)
    assert store.delete(missing) is False


def test_delete_and_leases(store: ContentStore) -> None:
    data = b"layer"
    store.write_bytes(dg(data), data)
    with store.lease([dg(data)]), store.lease([dg(data)]):
        assert store.delete(dg(data)) is False
    with store.lease([dg(data)]):
        assert store.leased(dg(data))
    assert not store.leased(dg(data))
    assert store.delete(dg(data)) is True
    assert not store.has(dg(data))


def test_usage_and_cleanup(store: ContentStore) -> None:
    store.write_bytes(dg(b"a" * 100), b"a" * 100)
    store.write_bytes(dg(b"b" * 50), b"b" * 50)
    assert store.usage() == (150, 2)
    assert asyncio.run(store.usage_async()) == (150, 2)
    # An interrupted download, and a file of another store that must stay.
    dangling = store.ingest(dg(b"partial"))
    dangling.write(b"part")
    dangling.flush()
    (store.tmp_dir / "unpack-xyz").mkdir()
    again = ContentStore(store.root)
    assert again.cleanup_tmp() == 1
    assert leftovers(again) == ["unpack-xyz"]
    assert again.usage() == (150, 2)
    dangling.abort()


def test_sha256_digest_helper() -> None:
    assert sha256_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
