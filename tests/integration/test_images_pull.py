"""PullImage, ImageStatus, ListImages, StreamImages, RemoveImage, ImageFsInfo through a real daemon.

Every test pulls from the session's docker-registry on 127.0.0.1 (seeded with
hack/testimages) into a fresh daemon root, and checks what the CRI client sees
and what is on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api import api_pb2
from hack.testimages import ImageInfo, RegistryClient, load_tree
from tests.integration.authproxy import AuthProxy
from tests.integration.conftest import ImageCrib, SeededRegistry
from tests.integration.daemon import Daemon
from tests.integration.test_unpack import compare, describe

pytestmark = pytest.mark.integration


def pull(d: Daemon, ref: str, timeout: float = 120, **auth: str) -> str:
    """PullImage ``ref``; keyword arguments are AuthConfig fields."""
    request = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
    if auth:
        request.auth.CopyFrom(api_pb2.AuthConfig(**auth))
    return str(d.images.PullImage(request, timeout=timeout).image_ref)


def status(d: Daemon, ref: str, verbose: bool = False) -> api_pb2.ImageStatusResponse:
    req = api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref), verbose=verbose)
    resp: api_pb2.ImageStatusResponse = d.images.ImageStatus(req, timeout=10)
    return resp


def remove(d: Daemon, ref: str) -> None:
    d.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)),
                         timeout=30)


def list_images(d: Daemon, ref: str = "") -> list[api_pb2.Image]:
    req = api_pb2.ListImagesRequest()
    if ref:
        req.filter.image.image = ref
    return list(d.images.ListImages(req, timeout=10).images)


def store(d: Daemon) -> Path:
    return d.root / "images"


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (du), each inode once."""
    seen: set[int] = set()
    total = 0
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total


def assert_store_consistent(d: Daemon) -> None:
    """No temp files; every blob's name is its sha256; every recorded image's parts exist."""
    root = store(d)
    assert [p.name for p in (root / "tmp").iterdir()] == []
    for blob in files_under(root / "blobs"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    for record_file in (root / "images").glob("*.json"):
        record = json.loads(record_file.read_text())
        for chain in record["chain_ids"]:
            assert (root / "layers" / chain[7:] / "diff").is_dir(), chain
        for digest in [record["id"], record["manifest_digest"], *record["layer_digests"]]:
            assert (root / "blobs" / "sha256" / digest[7:]).is_file(), digest


# -- pulling ---------------------------------------------------------------------------


def test_pull_by_tag_records_the_image(image_crib: ImageCrib,
                                       test_registry: SeededRegistry) -> None:
    d = image_crib()
    info = test_registry.images["busybox"]
    ref = test_registry.ref("busybox", "stable")
    image_id = pull(d, ref)
    assert image_id == info.config_digest  # the image id, as containerd returns it
    image = status(d, ref).image
    assert image.id == info.config_digest
    assert list(image.repo_tags) == [ref]
    name = f"{test_registry.address}/{info.repository}"
    assert list(image.repo_digests) == [f"{name}@{info.manifest_digest}"]
    assert 0 < image.size <= info.uncompressed_size  # file bytes, without tar headers
    assert image.spec.image == image_id
    assert not image.pinned
    assert_store_consistent(d)


def test_pull_without_tag_means_latest(image_crib: ImageCrib,
                                       test_registry: SeededRegistry) -> None:
    d = image_crib()
    name = f"{test_registry.address}/crib-test/busybox"
    image_id = pull(d, name)
    assert list(status(d, name).image.repo_tags) == [name + ":latest"]
    assert status(d, name + ":latest").image.id == image_id


def test_pull_by_digest_records_no_tag(image_crib: ImageCrib,
                                       test_registry: SeededRegistry) -> None:
    d = image_crib()
    info = test_registry.images["config"]
    ref = test_registry.digest_ref("config")
    assert pull(d, ref) == info.config_digest
    image = status(d, ref).image
    assert list(image.repo_tags) == []
    assert list(image.repo_digests) == [ref]
    assert status(d, test_registry.ref("config")).image.id == ""  # the tag was not recorded


def test_multiarch_index_picks_the_host_platform(image_crib: ImageCrib,
                                                 test_registry: SeededRegistry) -> None:
    info = test_registry.images["multiarch"]
    assert info.is_index
    with AuthProxy(test_registry.address) as proxy:
        address = proxy.address
        d = image_crib(insecure=[address])
        ref = f"{address}/{info.repository}:latest"
        image_id = pull(d, ref)
        amd64, arm64 = info.platforms["linux/amd64"], info.platforms["linux/arm64"]
        assert image_id == amd64.config_digest
        manifests = [r.path for r in proxy.records if "/manifests/" in r.path]
        assert f"/v2/{info.repository}/manifests/{amd64.manifest_digest}" in manifests
        assert f"/v2/{info.repository}/manifests/{arm64.manifest_digest}" not in manifests
        assert proxy.blob_fetches(arm64.config_digest) == 0
    image = status(d, image_id).image
    # like containerd, the repo digest is the index's: what the tag resolves to
    assert list(image.repo_digests) == [f"{address}/{info.repository}@{info.manifest_digest}"]
    layers = store(d) / "layers"
    arch_files = [p for p in layers.glob("*/diff/arch")]
    assert [p.read_text() for p in arch_files] == ["amd64\n"]


@pytest.mark.parametrize("name", ["foreign", "foreign-manifest"])
def test_foreign_only_image_fails_clearly(image_crib: ImageCrib, test_registry: SeededRegistry,
                                          name: str) -> None:
    d = image_crib()
    with pytest.raises(grpc.RpcError) as err:
        pull(d, test_registry.ref(name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "linux/amd64" in str(err.value.details()), err.value.details()
    assert "s390x" in str(err.value.details()), err.value.details()
    assert list_images(d) == []
    assert files_under(store(d) / "blobs") == []


@pytest.mark.parametrize("name", ["docker-schema2", "docker-list", "zstd", "config"])
def test_pull_formats(image_crib: ImageCrib, test_registry: SeededRegistry, name: str) -> None:
    d = image_crib()
    info = test_registry.images[name]
    assert pull(d, test_registry.ref(name)) == info.config_digest
    assert_store_consistent(d)
    image = status(d, info.config_digest).image
    assert image.size > 0


@pytest.mark.parametrize(("name", "uid", "username"), [
    ("users-numeric", 1000, ""), ("users-name", None, "app"), ("users-namegroup", None, "app"),
    ("busybox", None, ""),
])
def test_image_user(image_crib: ImageCrib, test_registry: SeededRegistry, name: str,
                    uid: int | None, username: str) -> None:
    d = image_crib()
    image = status(d, pull(d, test_registry.ref(name))).image
    assert image.HasField("uid") == (uid is not None)
    if uid is not None:
        assert image.uid.value == uid
    assert image.username == username


# -- status, list, stream ------------------------------------------------------------------


def test_status_by_every_kind_of_reference(image_crib: ImageCrib,
                                           test_registry: SeededRegistry) -> None:
    reg = test_registry.address
    d = image_crib(registries_conf=f'unqualified-search-registries = ["{reg}"]\n'
                                   f'[aliases]\n"bb" = "{reg}/crib-test/busybox"\n')
    info = test_registry.images["busybox"]
    image_id = pull(d, test_registry.ref("busybox", "latest"))
    name = f"{reg}/crib-test/busybox"
    hexid = image_id.removeprefix("sha256:")
    for ref in [image_id, hexid, hexid[:12], name, name + ":latest",
                f"{name}@{info.manifest_digest}", f"{name}:latest@{info.manifest_digest}",
                "crib-test/busybox", "crib-test/busybox:latest", "bb", "bb:latest"]:
        assert status(d, ref).image.id == image_id, ref
    for ref in ["crib-test/busybox:nope", f"{name}:1", "sha256:" + "0" * 64, "0" * 64,
                "busybox", "bb:2", f"{name}@sha256:{'1' * 64}", "UPPER/case", ""]:
        resp = status(d, ref)
        assert not resp.HasField("image"), ref


def test_verbose_status_carries_the_image_config(image_crib: ImageCrib,
                                                 test_registry: SeededRegistry) -> None:
    d = image_crib()
    image_id = pull(d, test_registry.ref("config"))
    assert status(d, image_id).info == {}
    info = json.loads(status(d, image_id, verbose=True).info["info"])
    spec = info["imageSpec"]
    assert spec["config"]["Entrypoint"] == ["/bin/sh", "-c"]
    assert spec["config"]["WorkingDir"] == "/work"
    assert spec["config"]["StopSignal"] == "SIGUSR1"
    assert spec["rootfs"]["type"] == "layers"
    assert info["chainID"].startswith("sha256:")


def test_three_tags_make_one_image(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib()
    info = test_registry.images["busybox"]
    assert info.tags == ["latest", "1", "stable"]
    refs = [test_registry.ref("busybox", t) for t in info.tags]
    assert {pull(d, r) for r in refs} == {info.config_digest}
    images = list_images(d)
    assert len(images) == 1
    assert sorted(images[0].repo_tags) == sorted(refs)
    assert len(images[0].repo_digests) == 1
    for ref in refs:
        assert status(d, ref).image.id == info.config_digest


def test_list_with_filter_and_stream(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib()
    ids = {pull(d, test_registry.ref(n)) for n in ("busybox", "layered", "config")}
    assert {i.id for i in list_images(d)} == ids
    config_id = test_registry.images["config"].config_digest
    assert config_id is not None
    assert [i.id for i in list_images(d, test_registry.ref("config"))] == [config_id]
    assert [i.id for i in list_images(d, config_id)] == [config_id]
    assert list_images(d, test_registry.ref("config", "nope")) == []
    streamed = [img.id for resp in d.images.StreamImages(api_pb2.StreamImagesRequest(),
                                                          timeout=10) for img in resp.images]
    assert sorted(streamed) == sorted(ids)
    req = api_pb2.StreamImagesRequest()
    req.filter.image.image = test_registry.ref("layered")
    streamed = [img.id for resp in d.images.StreamImages(req, timeout=10) for img in resp.images]
    assert streamed == [test_registry.images["layered"].config_digest]


# -- layers --------------------------------------------------------------------------------


@contextlib.contextmanager
def overlay_ro(lowerdirs: list[Path], where: Path) -> Iterator[Path]:
    """Mount the layers read-only (lowerdirs only, top-most first); unmount after."""
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    "ro,lowerdir=" + ":".join(map(str, lowerdirs)), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_whiteouts_and_opaque_dirs_give_exactly_the_expected_tree(
        image_crib: ImageCrib, test_registry: SeededRegistry, tmp_path: Path) -> None:
    d = image_crib()
    info = test_registry.images["layered"]
    image_id = pull(d, test_registry.ref("layered"))
    record = json.loads((store(d) / "images" / f"{image_id[7:]}.json").read_text())
    lowers = [store(d) / "layers" / c[7:] / "diff" for c in reversed(record["chain_ids"])]
    assert len(lowers) == 4
    assert info.tree_path is not None
    expected = load_tree(info.tree_path)
    with overlay_ro(lowers, tmp_path / "merged") as merged:
        got = describe(merged)
    compare(expected, got)
    assert not any(line.split()[4].startswith(str(tmp_path))
                   for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_shared_layers_are_unpacked_once(image_crib: ImageCrib,
                                         test_registry: SeededRegistry) -> None:
    d = image_crib()
    pull(d, test_registry.ref("busybox"))
    layers_before = {p.name for p in (store(d) / "layers").iterdir()}
    assert len(layers_before) == 1
    pull(d, test_registry.ref("users-numeric"))  # the same busybox base layer
    assert {p.name for p in (store(d) / "layers").iterdir()} == layers_before
    pull(d, test_registry.ref("layered"))
    assert len(list((store(d) / "layers").iterdir())) == 4
    assert "unpacked layer" in d.log.read_text()


# -- removal -------------------------------------------------------------------------------


def test_remove_frees_the_disk_space(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib()
    empty = disk_usage(store(d))
    image_id = pull(d, test_registry.ref("layered"))
    full = disk_usage(store(d))
    assert full - empty > test_registry.images["layered"].uncompressed_size // 2
    remove(d, test_registry.ref("layered"))
    assert status(d, image_id).image.id == ""
    assert files_under(store(d) / "blobs") == []
    assert list((store(d) / "layers").iterdir()) == []
    assert list((store(d) / "images").iterdir()) == []
    assert disk_usage(store(d)) <= empty
    remove(d, test_registry.ref("layered"))  # a missing image is fine
    remove(d, image_id)


def test_remove_keeps_what_other_images_use(image_crib: ImageCrib,
                                            test_registry: SeededRegistry) -> None:
    d = image_crib()
    busybox = pull(d, test_registry.ref("busybox"))
    layered = pull(d, test_registry.ref("layered"))
    remove(d, layered)
    assert status(d, layered).image.id == ""
    assert status(d, busybox).image.id == busybox
    assert len(list((store(d) / "layers").iterdir())) == 1
    assert_store_consistent(d)
    remove(d, busybox)
    assert files_under(store(d) / "blobs") == []


def test_remove_by_one_tag_only_untags(image_crib: ImageCrib,
                                       test_registry: SeededRegistry) -> None:
    d = image_crib()
    refs = [test_registry.ref("busybox", t) for t in ("latest", "1", "stable")]
    image_id = {pull(d, r) for r in refs}.pop()
    remove(d, refs[0])
    assert sorted(status(d, image_id).image.repo_tags) == sorted(refs[1:])
    assert status(d, refs[0]).image.id == ""
    remove(d, refs[1])
    assert list(status(d, image_id).image.repo_tags) == [refs[2]]
    remove(d, refs[2])  # the last tag: the image goes
    assert status(d, image_id).image.id == ""
    assert files_under(store(d) / "blobs") == []


def test_remove_by_digest_and_by_id(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib()
    refs = [test_registry.ref("busybox", t) for t in ("latest", "1")]
    image_id = {pull(d, r) for r in refs}.pop()
    remove(d, test_registry.digest_ref("busybox"))
    assert status(d, image_id).image.id == ""
    image_id = {pull(d, r) for r in refs}.pop()
    remove(d, image_id.removeprefix("sha256:")[:12])
    assert list_images(d) == []
    assert files_under(store(d) / "blobs") == []


def test_image_fs_info(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib()
    before = d.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10)
    assert len(before.image_filesystems) == 1
    fs = before.image_filesystems[0]
    assert fs.fs_id.mountpoint == str(store(d))
    assert fs.timestamp > 0
    pull(d, test_registry.ref("layered"))
    after = d.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10).image_filesystems[0]
    grown = after.used_bytes.value - fs.used_bytes.value
    assert grown >= test_registry.images["layered"].uncompressed_size // 2
    assert after.inodes_used.value > fs.inodes_used.value + 100
    # no containers yet: the writable-layer filesystem is reported, and empty
    writable = d.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(),
                                    timeout=10).container_filesystems
    assert len(writable) == 1 and writable[0].used_bytes.value == 0
    assert os.path.ismount(fs.fs_id.mountpoint) or Path(fs.fs_id.mountpoint).is_dir()


def test_repull_of_a_moved_tag_moves_the_tag(image_crib: ImageCrib,
                                             test_registry: SeededRegistry) -> None:
    repo = "crib-test/moving"
    client = RegistryClient(test_registry.address)
    first, second = test_registry.images["busybox"], test_registry.images["config"]

    def point_tag_at(info: ImageInfo) -> None:
        for digest in info.blobs:
            client.push_blob(repo, digest, info.blob_path(digest))
        data = info.blob_path(info.manifest_digest).read_bytes()
        client.push_manifest(repo, "current", data, info.media_type)

    d = image_crib()
    ref = f"{test_registry.address}/{repo}:current"
    try:
        point_tag_at(first)
        assert pull(d, ref) == first.config_digest
        point_tag_at(second)
        assert pull(d, ref) == second.config_digest
    finally:
        client.close()
    assert list(status(d, ref).image.repo_tags) == [ref]
    old = status(d, first.config_digest).image
    assert old.id == first.config_digest and list(old.repo_tags) == []  # kept, untagged
    assert len(list_images(d)) == 2
