"""image.pinned_images: pattern syntax, matching, the config check, the RPCs' `pinned`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from api import api_pb2
from cri.config import Config, ConfigError, load
from cri.errors import InvalidArgument
from imageservice.index import ImageRecord
from imageservice.pinning import PinnedImages, pattern_error
from imageservice.service import ImageService

PAUSE = "registry.k8s.io/pause:3.10"
ID = "sha256:" + "ab" * 32


@pytest.mark.parametrize("pattern", [PAUSE, "busybox", "registry.k8s.io/pause*", "*pause*", "*",
                                     ID, "not a reference"])
def test_valid_patterns(pattern: str) -> None:
    assert pattern_error(pattern) is None
    PinnedImages.compile([pattern])


@pytest.mark.parametrize("pattern", ["", " busybox", "a*b", "*pause", "**", "a**b*"])
def test_invalid_patterns(pattern: str) -> None:
    assert pattern_error(pattern) is not None
    with pytest.raises(InvalidArgument, match=r"image\.pinned_images"):
        PinnedImages.compile([pattern])


def test_exact_patterns_are_normalised_and_match_whole_names() -> None:
    pinned = PinnedImages.compile([PAUSE, "busybox", ID])
    assert pinned.matches("sha256:" + "0" * 64, [PAUSE])
    assert pinned.matches("x", ["docker.io/library/busybox:latest"])
    assert pinned.matches(ID, [])
    assert not pinned.matches("x", ["registry.k8s.io/pause:3.9"])
    assert not pinned.matches("x", ["docker.io/library/busybox:1.36"])
    assert not pinned.matches("x", ["docker.io/other/busybox:latest"])


def test_globs_and_keywords() -> None:
    pinned = PinnedImages.compile(["registry.k8s.io/pause*", "*coredns*"])
    assert pinned.matches("x", ["registry.k8s.io/pause:3.9"])
    assert pinned.matches("x", ["registry.k8s.io/pause@sha256:" + "1" * 64])
    assert pinned.matches("x", ["registry.k8s.io/coredns/coredns:v1.11.1"])
    assert not pinned.matches("x", ["docker.io/library/registry.k8s.io:1"])
    assert not pinned.matches("x", ["docker.io/library/busybox:latest"])
    assert not PinnedImages.compile([]).matches("x", [PAUSE])
    assert PinnedImages.compile(["*"]).matches("x", ["anything"])
    assert not PinnedImages.compile([]) and PinnedImages.compile(["*"])


def test_config_rejects_a_bad_pattern_naming_the_key(tmp_path: Path) -> None:
    f = tmp_path / "crib.toml"
    f.write_text('[image]\npinned_images = ["registry.k8s.io/*/pause"]\n')
    with pytest.raises(ConfigError) as err:
        load(f, tmp_path / "crib.d")
    assert str(err.value).startswith(f"{f}: image.pinned_images: 'registry.k8s.io/*/pause'")
    f.write_text('[image]\npinned_images = ["registry.k8s.io/pause*"]\n')
    assert load(f, tmp_path / "crib.d").image.pinned_images == ["registry.k8s.io/pause*"]
    assert Config().image.pinned_images == []


# -- the RPCs report it, and a reload changes it ------------------------------------------


def _record(service: ImageService, config: dict[str, Any], tags: list[str]) -> ImageRecord:
    content = service.manager.stores.content
    data = json.dumps(config).encode()
    config_id = "sha256:" + hashlib.sha256(data).hexdigest()
    content.write_bytes(config_id, data)
    manifest = json.dumps({"config": config_id}).encode()
    manifest_id = "sha256:" + hashlib.sha256(manifest).hexdigest()
    content.write_bytes(manifest_id, manifest)
    rec = ImageRecord(id=config_id, repo_tags=tags, repo_digests=[], size=1, config=config,
                      manifest_digest=manifest_id, chain_ids=[], diff_ids=[])
    return service.manager.stores.index.add_or_update(rec)


@pytest.fixture
def service(tmp_path: Path) -> ImageService:
    cfg = Config(root=str(tmp_path / "root"))
    cfg.image.registries_conf = str(tmp_path / "registries.conf")
    cfg.image.registries_conf_dir = str(tmp_path / "registries.conf.d")
    cfg.image.pinned_images = ["registry.k8s.io/pause*"]
    s = ImageService(cfg)
    asyncio.run(s.start())
    return s


def _status(service: ImageService, name: str) -> api_pb2.Image:
    request = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=name))
    return asyncio.run(service.ImageStatus(request, None)).image  # type: ignore[arg-type]


def _listed(service: ImageService) -> dict[str, bool]:
    request = api_pb2.ListImagesRequest()
    response = asyncio.run(service.ListImages(request, None))  # type: ignore[arg-type]
    return {image.repo_tags[0]: image.pinned for image in response.images}


def test_status_and_list_report_pinned(service: ImageService) -> None:
    _record(service, {"n": 1}, [PAUSE])
    _record(service, {"n": 2}, ["docker.io/library/busybox:latest"])
    assert _status(service, PAUSE).pinned
    assert not _status(service, "busybox").pinned
    assert _listed(service) == {PAUSE: True, "docker.io/library/busybox:latest": False}


def test_reload_changes_pinning_live(service: ImageService, tmp_path: Path) -> None:
    _record(service, {"n": 1}, [PAUSE])
    _record(service, {"n": 2}, ["docker.io/library/busybox:latest"])
    new = dataclasses.replace(service.manager.image, pinned_images=["busybox"])
    assert asyncio.run(service.reload(new))
    assert _listed(service) == {PAUSE: False, "docker.io/library/busybox:latest": True}
    # a refused table (a registries.conf that does not parse) leaves the pins as they were
    broken = tmp_path / "broken.conf"
    broken.write_text("this is [not toml")
    bad = dataclasses.replace(new, pinned_images=[], registries_conf=str(broken))
    assert not asyncio.run(service.reload(bad))
    assert _listed(service)["docker.io/library/busybox:latest"] is True
