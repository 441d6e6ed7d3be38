"""The generic pieces under the runtime: record store, name reservations, undo stack."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import AlreadyExists, NotFound
from runtimeservice.filters import labels_match, resolve_id
from runtimeservice.names import Reservations, fingerprint
from runtimeservice.store import RecordStore
from runtimeservice.undo import UndoStack


class State(StrEnum):
    A = "a"
    B = "b"


@dataclass(frozen=True)
class Rec:
    id: str
    state: State = State.A
    blob: bytes = b""
    ips: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


def test_store_roundtrip_and_update(tmp_path: Path) -> None:
    store = RecordStore(tmp_path / "recs", Rec, "thing")
    store.load()
    store.put(Rec(id="abc123", blob=b"\x00\xff", ips=("10.0.0.1",), labels={"k": "v"}))
    store.put(Rec(id="abd456"))
    updated = store.update("abc123", state=State.B)
    assert updated.state is State.B and updated.blob == b"\x00\xff"
    on_disk = json.loads((tmp_path / "recs" / "abc123.json").read_text())
    assert on_disk["state"] == "b"
    again = RecordStore(tmp_path / "recs", Rec, "thing")
    loaded = {r.id: r for r in again.load()}
    assert loaded["abc123"] == updated
    assert again.resolve("abc").id == "abc123"
    with pytest.raises(NotFound, match="ambiguous"):
        again.resolve("ab")
    with pytest.raises(NotFound, match="thing 'zzz' not found"):
        again.resolve("zzz")
    again.delete("abc123")
    again.delete("abc123")
    assert not (tmp_path / "recs" / "abc123.json").exists()
    assert again.lookup("abc123") is None


def test_store_ignores_corrupt_and_temp_files(tmp_path: Path) -> None:
    d = tmp_path / "recs"
    d.mkdir()
    (d / "bad.json").write_text("{not json")
    (d / ".x.json.123.tmp").write_text("partial")
    store = RecordStore(d, Rec, "thing")
    assert store.load() == []
    assert not (d / ".x.json.123.tmp").exists()


def test_filters() -> None:
    assert labels_match({}, {"a": "1"})
    assert labels_match({"a": "1"}, {"a": "1", "b": "2"})
    assert not labels_match({"a": "1", "c": "3"}, {"a": "1"})
    assert resolve_id("ab", ["abc", "xyz"]) == "abc"
    assert resolve_id("a", ["abc", "abd"]) is None
    assert resolve_id("", ["abc"]) is None


def test_reservations_join_identical_and_refuse_others() -> None:
    async def main() -> None:
        res = Reservations("pod")
        started = asyncio.Event()
        release = asyncio.Event()
        calls = 0

        async def create() -> str:
            nonlocal calls
            calls += 1
            started.set()
            await release.wait()
            return "id-1"

        req = api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig(hostname="h"))
        fp = fingerprint(req)
        first = asyncio.create_task(res.create_once("ns/name", fp, create))
        await started.wait()
        retry = asyncio.create_task(res.create_once("ns/name", fp, create))
        with pytest.raises(AlreadyExists, match="being created"):
            await res.create_once("ns/name", "other", create)
        # the first caller gives up (client timeout): the work goes on for the retry
        first.cancel()
        release.set()
        assert await retry == "id-1"
        assert calls == 1
        assert await res.create_once("ns/name", fp, create) == "id-1"
        with pytest.raises(AlreadyExists, match="in use by id-1"):
            await res.create_once("ns/name", "other", create)
        res.release("ns/name", "id-1")
        assert res.owner("ns/name") is None

    asyncio.run(main())


def test_reservation_failure_frees_the_name() -> None:
    async def main() -> None:
        res = Reservations("pod")

        async def boom() -> str:
            raise RuntimeError("x")

        with pytest.raises(RuntimeError):
            await res.create_once("n", "fp", boom)

        async def ok() -> str:
            return "id-2"

        assert await res.create_once("n", "fp", ok) == "id-2"

    asyncio.run(main())


def test_undo_runs_in_reverse_and_survives_failures() -> None:
    async def main() -> list[str]:
        done: list[str] = []

        async def async_step() -> None:
            done.append("async")

        def bad() -> None:
            raise OSError("stuck")

        with pytest.raises(ValueError):
            async with UndoStack("test") as undo:
                undo.push("one", lambda: done.append("one"))
                undo.push("bad", bad)
                undo.push("two", async_step)
                raise ValueError("fail")
        async with UndoStack("ok") as undo:
            undo.push("never", lambda: done.append("never"))
            undo.commit()
        return done

    assert asyncio.run(main()) == ["async", "one"]
