"""ImageIndex: lookups, tag moves, merges, persistence, garbage."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cri.errors import InvalidArgument, NotFound
from imageservice.index import Garbage, ImageIndex, ImageRecord, image_user
from imageservice.layers import chain_ids


def h(label: str) -> str:
    return "sha256:" + hashlib.sha256(label.encode()).hexdigest()


def rec(
    name: str,
    tags: list[str] | None = None,
    digests: list[str] | None = None,
    layers: list[str] | None = None,
    user: str = "",
    **kw: Any,
) -> ImageRecord:
    """An image whose config/manifest/layer digests derive from `name` and `layers`."""
    layers = layers if layers is not None else [f"{name}-l0"]
    diff_ids = [h(f"diff:{x}") for x in layers]
    return ImageRecord(
        id=h(f"config:{name}"),
        repo_tags=tags or [],
        repo_digests=digests or [],
        size=100 * len(layers),
        config={"architecture": "amd64", "config": {"User": user}, "rootfs": {}},
        manifest_digest=h(f"manifest:{name}"),
        chain_ids=chain_ids(diff_ids),
        diff_ids=diff_ids,
        layer_digests=[h(f"blob:{x}") for x in layers],
        layer_media_types=["application/vnd.oci.image.layer.v1.tar+gzip"] * len(layers),
        **kw,
    )


@pytest.fixture
def index(tmp_path: Path) -> ImageIndex:
    return ImageIndex(tmp_path / "images")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (None, "")),
        ("1000", (1000, "")),
        ("0", (0, "")),
        ("app", (None, "app")),
        ("1000:100", (1000, "")),
        ("app:grp", (None, "app")),
        ("app:100", (None, "app")),
    ],
)
def test_image_user(user: str, expected: tuple[int | None, str]) -> None:
    assert image_user({"config": {"User": user}}) == expected
    r = rec("x", user=user)
    assert (r.uid, r.username) == expected


def test_image_user_without_config_section() -> None:
    assert image_user({}) == (None, "")
    assert image_user({"config": None}) == (None, "")


def test_lookups(index: ImageIndex) -> None:
    tag = "docker.io/library/busybox:latest"
    rd = "docker.io/library/busybox@" + h("index:busybox")
    r = index.add_or_update(rec("busybox", [tag], [rd]))
    hexid = r.id[7:]
    for ref in (r.id, hexid, hexid[:12], "sha256:" + hexid[:13], tag, rd):
        got = index.get(ref)
        assert got is not None and got.id == r.id, ref
    for miss in ("", hexid[:11], "busybox", "docker.io/library/busybox:other", h("nothing")):
        assert index.get(miss) is None, miss
    assert [x.id for x in index.list(tag)] == [r.id]
    assert index.list("docker.io/library/nope:1") == []
    assert len(index.list()) == len(index) == 1


def test_ambiguous_prefix_matches_nothing(index: ImageIndex) -> None:
    a, b = rec("a"), rec("b")
    # Force two ids with a common 12-digit prefix.
    b.id = a.id[:19] + ("0" if a.id[19] != "0" else "1") + a.id[20:]
    index.add_or_update(a)
    index.add_or_update(b)
    assert index.get(a.id[:19]) is None
    assert index.get(a.id[:20]).id == a.id  # type: ignore[union-attr]


def test_readers_get_copies(index: ImageIndex) -> None:
    index.add_or_update(rec("a", ["t:1"]))
    got = index.get("t:1")
    assert got is not None
    got.repo_tags.append("t:2")
    got.config["config"]["User"] = "root"
    again = index.get("t:1")
    assert again is not None
    assert again.repo_tags == ["t:1"] and again.config["config"]["User"] == ""


def test_tags_of_one_image_merge(index: ImageIndex) -> None:
    first = index.add_or_update(rec("a", ["r:1"], ["r@" + h("m1")]))
    for t in ("r:2", "r:3"):
        index.add_or_update(rec("a", [t]))
    merged = index.add_or_update(rec("a", ["r:1"], ["other@" + h("m1")], pinned=False))
    assert merged.repo_tags == ["r:1", "r:2", "r:3"]
    assert merged.repo_digests == ["r@" + h("m1"), "other@" + h("m1")]
    assert merged.created_at == first.created_at
    assert len(index) == 1


def test_pinned_stays_once_set(index: ImageIndex) -> None:
    index.add_or_update(rec("pause", ["p:1"], pinned=True))
    assert index.add_or_update(rec("pause", ["p:1"])).pinned


def test_a_tag_moves_to_the_newly_pulled_image(index: ImageIndex) -> None:
    old = index.add_or_update(rec("v1", ["app:latest", "app:v1"]))
    new = index.add_or_update(rec("v2", ["app:latest"]))
    assert index.get("app:latest").id == new.id  # type: ignore[union-attr]
    kept = index.get(old.id)
    assert kept is not None and kept.repo_tags == ["app:v1"]
    # Moving the last tag leaves an untagged image behind.
    index.add_or_update(rec("v3", ["app:v1"]))
    dangling = index.get(old.id)
    assert dangling is not None and dangling.repo_tags == []
    reloaded = ImageIndex(index.dir.parent)
    assert reloaded.get("app:latest").id == new.id  # type: ignore[union-attr]
    assert reloaded.get(old.id).repo_tags == []  # type: ignore[union-attr]


def test_remove_by_any_reference(index: ImageIndex) -> None:
    a = index.add_or_update(rec("a", ["a:1", "a:2"]))
    removed = index.remove("a:2")
    assert removed.id == a.id
    assert index.get("a:1") is None and index.get(a.id) is None
    assert not (index.dir / f"{a.id[7:]}.json").exists()
    with pytest.raises(NotFound, match="a:1"):
        index.remove("a:1")


def test_untag(index: ImageIndex) -> None:
    index.add_or_update(rec("a", ["a:1", "a:2"], ["a@" + h("ma")]))
    left = index.untag("a:1")
    assert left.repo_tags == ["a:2"]
    assert index.untag("a@" + h("ma")).repo_digests == []
    assert index.get("a:1") is None and index.get("a:2") is not None
    with pytest.raises(NotFound):
        index.untag("a:1")


def test_garbage_is_exactly_the_unshared_part(index: ImageIndex) -> None:
    base = ["base-0", "base-1"]
    a = index.add_or_update(rec("a", ["a:1"], ["a@" + h("index:a")], layers=[*base, "a-top"]))
    b = index.add_or_update(rec("b", ["b:1"], layers=[*base, "b-top"]))
    c = index.add_or_update(rec("c", ["c:1"], layers=["c-only"]))
    removed = index.remove("a:1")
    g = index.garbage([removed])
    assert g == Garbage(
        blobs=sorted(
            [a.id, a.manifest_digest, h("index:a"), h("blob:a-top")],
        ),
        chain_ids=[a.chain_ids[2]],
    )
    assert set(g.blobs).isdisjoint(b.blobs() | c.blobs())
    # Removing the last user of the base layers frees them too.
    g = index.garbage([index.remove("b:1")])
    assert g.chain_ids == sorted(b.chain_ids)
    assert set(g.blobs) == b.blobs()
    blobs, chains = index.referenced()
    assert blobs == c.blobs() and chains == set(c.chain_ids)


def test_same_config_with_new_blobs_makes_the_old_ones_garbage(index: ImageIndex) -> None:
    first = index.add_or_update(rec("a", ["r:1"]))
    recompressed = rec("a", ["mirror/r:1"])
    recompressed.manifest_digest = h("manifest:a-zstd")
    recompressed.layer_digests = [h("blob:a-zstd")]
    index.add_or_update(recompressed)
    g = index.garbage([first])
    assert g.blobs == sorted([first.manifest_digest, *first.layer_digests])
    assert g.chain_ids == []


def test_records_persist_atomically(index: ImageIndex) -> None:
    r = index.add_or_update(rec("a", ["a:1"], user="1000"))
    files = sorted(os.listdir(index.dir))
    assert files == [f"{r.id[7:]}.json"]
    on_disk = json.loads((index.dir / files[0]).read_text())
    assert on_disk["repo_tags"] == ["a:1"] and on_disk["uid"] == 1000
    # A temp file from an interrupted write and a corrupt record are ignored at load.
    (index.dir / f".{r.id[7:]}.json.123.tmp").write_text("{")
    (index.dir / ("0" * 64 + ".json")).write_text("{not json")
    again = ImageIndex(index.dir.parent)
    assert [x.id for x in again.list()] == [r.id]
    assert again.get(r.id) == r
    assert not (index.dir / f".{r.id[7:]}.json.123.tmp").exists()


def test_load_resolves_a_name_claimed_twice(index: ImageIndex) -> None:
    old = index.add_or_update(rec("old", ["x:1", "x:2"]))
    new = index.add_or_update(rec("new", ["x:3"]))
    # Simulate a crash between the two writes of a tag move: both files claim x:1.
    path = index.dir / f"{new.id[7:]}.json"
    data = json.loads(path.read_text())
    data["repo_tags"] = ["x:3", "x:1"]
    path.write_text(json.dumps(data))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    again = ImageIndex(index.dir.parent)
    assert again.get("x:1").id == new.id  # type: ignore[union-attr]
    assert again.get(old.id).repo_tags == ["x:2"]  # type: ignore[union-attr]
    assert json.loads((index.dir / f"{old.id[7:]}.json").read_text())["repo_tags"] == ["x:2"]


def test_invalid_records_are_refused(index: ImageIndex) -> None:
    bad = rec("a")
    bad.id = "sha256:nothex"
    with pytest.raises(InvalidArgument):
        index.add_or_update(bad)
    bad = rec("a")
    bad.chain_ids = bad.chain_ids[:0]
    with pytest.raises(InvalidArgument, match="chain ids"):
        index.add_or_update(bad)
    assert len(index) == 0 and os.listdir(index.dir) == []


def test_concurrent_writers_and_readers(index: ImageIndex) -> None:
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(10):
                index.add_or_update(rec(f"img{i}-{j}", ["shared:latest", f"own:{i}-{j}"]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(200):
                for r in index.list():
                    assert r.id.startswith("sha256:")
                index.get("shared:latest")
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    holders = [r for r in index.list() if "shared:latest" in r.repo_tags]
    assert len(holders) == 1 and len(index) == 30
    again = ImageIndex(index.dir.parent)
    assert [r.id for r in again.list() if "shared:latest" in r.repo_tags] == [holders[0].id]


def test_async_wrappers(index: ImageIndex) -> None:
    async def go() -> None:
        r = await index.add_or_update_async(rec("a", ["a:1"]))
        assert (await index.remove_async(r.id)).id == r.id

    asyncio.run(go())
    assert len(index) == 0
