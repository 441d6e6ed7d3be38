"""ImageManager logic on a temporary store (no root, no network): lookup, removal, GC, reload."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from cri.config import Config
from cri.errors import FailedPrecondition
from imageservice.images import ImageManager, describe_changes
from imageservice.index import ImageRecord
from imageservice.registries import Mirror, RegistriesConfig, RegistryTable


def blob(manager: ImageManager, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    manager.stores.content.write_bytes(digest, data)
    return digest


def record(manager: ImageManager, config: dict[str, object], tags: list[str],
           digests: list[str] | None = None) -> ImageRecord:
    config_id = blob(manager, json.dumps(config).encode())
    manifest = blob(manager, json.dumps({"config": config_id}).encode())
    rec = ImageRecord(id=config_id, repo_tags=tags, repo_digests=digests or [], size=1,
                      config=config, manifest_digest=manifest, chain_ids=[], diff_ids=[])
    return manager.stores.index.add_or_update(rec)


@pytest.fixture
def manager(tmp_path: Path) -> ImageManager:
    cfg = Config(root=str(tmp_path / "root"))
    cfg.image.registries_conf = str(tmp_path / "registries.conf")
    cfg.image.registries_conf_dir = str(tmp_path / "registries.conf.d")
    (tmp_path / "registries.conf").write_text(
        'unqualified-search-registries = ["registry.example:5000"]\n')
    m = ImageManager(cfg)
    asyncio.run(m.start())
    return m


def test_find_by_id_prefix_tag_digest_and_short_names(manager: ImageManager) -> None:
    name = "registry.example:5000/team/app"
    rec = record(manager, {"config": {"User": "1000"}}, [f"{name}:v1"],
                 [f"{name}@sha256:{'a' * 64}"])
    for query in (rec.id, rec.id[7:], rec.id[7:19], f"{name}:v1", f"{name}@sha256:{'a' * 64}",
                  "team/app:v1", f"{name}:v1@sha256:{'a' * 64}"):
        found = manager.find(query)
        assert found is not None and found.id == rec.id, query
    for query in ("team/app", "team/app:v2", "", rec.id[7:17], "not a reference"):
        assert manager.find(query) is None, query
    assert manager.list_images("team/app:v1")[0].id == rec.id
    assert rec.uid == 1000


def test_remove_untags_then_removes_and_collects_blobs(manager: ImageManager) -> None:
    shared = record(manager, {"config": {}, "n": 1}, ["r.example/a:1", "r.example/a:2"])
    asyncio.run(manager.remove("r.example/a:1"))
    after = manager.find(shared.id)
    assert after is not None and after.repo_tags == ["r.example/a:2"]
    asyncio.run(manager.remove("r.example/a:2"))
    assert manager.find(shared.id) is None
    assert manager.stores.content.digests() == []
    asyncio.run(manager.remove("r.example/a:2"))  # absent: fine


def test_in_use_images_are_refused(manager: ImageManager) -> None:
    rec = record(manager, {"config": {}, "n": 2}, ["r.example/b:1", "r.example/b:2"])
    used = {rec.id}
    manager.set_in_use(lambda image_id: image_id in used)
    asyncio.run(manager.remove("r.example/b:1"))  # untagging leaves the image: allowed
    with pytest.raises(FailedPrecondition, match="in use"):
        asyncio.run(manager.remove(rec.id))
    with pytest.raises(FailedPrecondition, match="in use"):
        asyncio.run(manager.remove("r.example/b:2"))
    used.clear()
    asyncio.run(manager.remove(rec.id))
    assert manager.find(rec.id) is None


def test_start_collects_orphans_and_temp_files(manager: ImageManager, tmp_path: Path) -> None:
    kept = record(manager, {"config": {}, "n": 3}, ["r.example/c:1"])
    orphan = blob(manager, b"left behind by a crash")
    (manager.root / "tmp" / "ingest-0123456789abcdef-x").write_bytes(b"partial")
    again = ImageManager(manager.cfg)
    asyncio.run(again.start())
    assert not again.stores.content.has(orphan)
    assert again.stores.content.has(kept.id)
    assert list((manager.root / "tmp").iterdir()) == []


def test_reload_keeps_the_old_configuration_on_errors(manager: ImageManager,
                                                      tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text("this is [not toml")
    asyncio.run(manager.reload())
    assert manager.policy.registries.unqualified_search_registries == ["registry.example:5000"]
    conf.write_text('[[registry]]\nlocation = "r.example"\n'
                    '[[registry.mirror]]\nlocation = "m.example"\n')
    asyncio.run(manager.reload())
    table = manager.policy.registries.find_registry("r.example/x:1")
    assert table is not None and [m.location for m in table.mirrors] == ["m.example"]


def test_describe_changes() -> None:
    old = RegistriesConfig(registries=[RegistryTable("a.example", "a.example")])
    new = RegistriesConfig(
        registries=[RegistryTable("a.example", "a.example", mirrors=(Mirror("m.example"),)),
                    RegistryTable("b.example", "b.example", blocked=True)],
        unqualified_search_registries=["a.example"])
    lines = describe_changes(old, new)
    assert any("'a.example' changed" in line and "m.example" in line for line in lines)
    assert any("'b.example' added" in line and "blocked True" in line for line in lines)
    assert any("unqualified-search-registries" in line for line in lines)
    assert describe_changes(new, new) == []
