"""LayerStore: chain ids, atomic add/remove, leases, reload (no root needed)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

import imageservice.layers as layers_mod
from cri.errors import InvalidArgument, NotFound
from imageservice.layers import LayerStore, chain_id, chain_ids
from imageservice.unpack import LayerError
from tests.unit.test_unpack_basic import d, digest, f, layer, tree

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def test_chain_ids_follow_the_oci_definition() -> None:
    c2 = "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()
    c3 = "sha256:" + hashlib.sha256(f"{c2} {D3}".encode()).hexdigest()
    assert chain_id(None, D1) == D1
    assert chain_id(D1, D2) == c2
    assert chain_ids([D1, D2, D3]) == [D1, c2, c3]
    assert chain_ids([]) == []
    with pytest.raises(InvalidArgument):
        chain_id(None, "md5:abc")


def test_add_lowerdirs_usage_and_reload(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = LayerStore(root, sync=False)
    b1, m1, d1 = layer(tmp_path, [d("etc"), f("etc/a", b"aaaa")])
    b2, m2, d2 = layer(tmp_path, [f("etc/b", b"bb")], compression="zstd")
    c1, c2 = chain_ids([d1, d2])

    meta1 = store.add(None, d1, b1, m1)
    meta2 = store.add(c1, d2, b2, m2)
    assert (meta1.chain_id, meta1.diff_id, meta1.parent) == (c1, d1, None)
    assert (meta2.chain_id, meta2.parent, meta2.size) == (c2, c1, 2)
    assert store.has(c1) and store.has(c2)
    assert store.diff_path(c1) == root / "layers" / c1[7:] / "diff"
    assert tree(store.diff_path(c1)) == {"etc": "d 0o755", "etc/a": "f 0o644 aaaa"}
    assert store.lowerdirs([c1, c2]) == [store.diff_path(c2), store.diff_path(c1)]
    assert store.usage() == (6, meta1.inodes + meta2.inodes)
    meta = json.loads((root / "layers" / c2[7:] / "meta.json").read_text())
    assert meta["diff_id"] == d2 and meta["parent"] == c1
    assert os.listdir(root / "tmp") == []

    again = LayerStore(root, sync=False)
    assert {m.chain_id for m in again.all()} == {c1, c2}
    assert again.get(c2) == meta2


def test_add_is_idempotent_and_requires_the_parent(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images", sync=False)
    b1, m1, d1 = layer(tmp_path, [f("a", b"1")])
    first = store.add(None, d1, b1, m1)
    assert store.add(None, d1, b1, m1) == first
    with pytest.raises(NotFound, match="parent"):
        store.add(D3, d1, b1, m1)


def test_failed_add_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = LayerStore(root, sync=False)
    blob, media, _ = layer(tmp_path, [f("a", b"1")])
    with pytest.raises(LayerError):
        store.add(None, digest(b"wrong"), blob, media)
    assert os.listdir(root / "layers") == []
    assert os.listdir(root / "tmp") == []
    assert store.all() == []


def test_concurrent_adds_unpack_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LayerStore(tmp_path / "images", sync=False)
    blob, media, diff = layer(tmp_path, [f("x" * 10 + str(i), os.urandom(5000)) for i in range(50)])
    calls = []
    real = layers_mod.unpack_layer

    def counting(*args: object, **kw: object) -> object:
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(layers_mod, "unpack_layer", counting)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(store.add(None, diff, blob, media)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({id(r) for r in results}) == 1 and len(results) == 4


def test_remove_and_leases(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = LayerStore(root, sync=False)
    blob, media, diff = layer(tmp_path, [d("ro", 0o555), f("ro/f", b"1", 0o400)])
    store.add(None, diff, blob, media)
    with store.lease([diff, diff]):
        assert store.leased(diff)
        assert store.remove(diff) is False
        assert store.has(diff)
    assert not store.leased(diff)
    assert store.remove(diff) is True
    assert not store.has(diff)
    assert store.remove(diff) is False  # already gone: fine
    assert os.listdir(root / "layers") == [] and os.listdir(root / "tmp") == []
    with pytest.raises(NotFound):
        store.diff_path(diff)
    with pytest.raises(NotFound):
        store.lowerdirs([diff])


def test_a_lease_can_be_taken_before_the_layer_exists(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images", sync=False)
    blob, media, diff = layer(tmp_path, [f("a")])
    with store.lease([diff]):
        store.add(None, diff, blob, media)
        assert store.remove(diff) is False
    assert store.remove(diff) is True


def test_start_up_cleanup_and_broken_dirs(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = LayerStore(root, sync=False)
    blob, media, diff = layer(tmp_path, [f("a")])
    store.add(None, diff, blob, media)
    # Debris of a crash: an unpack in flight, a removal in flight, a layer dir without meta.
    (root / "tmp" / "unpack-abc" / "diff" / "x").mkdir(parents=True)
    (root / "tmp" / "remove-abc" / "layer").mkdir(parents=True)
    (root / "tmp" / "ingest-keep").write_bytes(b"not mine")
    (root / "layers" / ("f" * 64) / "diff").mkdir(parents=True)
    again = LayerStore(root, sync=False)
    assert again.cleanup_tmp() == 2
    assert sorted(os.listdir(root / "tmp")) == ["ingest-keep"]
    assert os.listdir(root / "layers") == [diff[7:]]
    assert [m.chain_id for m in again.all()] == [diff]


def test_async_wrappers_and_sync_mode(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images")  # sync=True: syncfs before the rename
    blob, media, diff = layer(tmp_path, [f("a", b"abc")])

    async def go() -> None:
        meta = await store.add_async(None, diff, blob, media)
        assert meta.size == 3
        assert await store.remove_async(diff)

    asyncio.run(go())
    assert store.all() == []
