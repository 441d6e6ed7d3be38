"""Building the test images: deterministic, cached, and with the promised content."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from hack.testimages import ImageInfo, build_all, build_image, load_tree, model
from hack.testimages.corrupt import corrupted_layer_bytes
from hack.testimages.rootfs import DEFAULT_BUSYBOX

pytestmark = pytest.mark.skipif(not DEFAULT_BUSYBOX.exists(),
                                reason="busybox-static is not installed")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageInfo]:
    return build_all(tmp_path_factory.mktemp("cache"))


def manifest_of(info: ImageInfo, digest: str | None = None) -> dict:
    return json.loads(info.blob_path(digest or info.manifest_digest).read_bytes())


def config_of(info: ImageInfo, digest: str | None = None) -> dict:
    return json.loads(info.blob_path(manifest_of(info, digest)["config"]["digest"]).read_bytes())


def layer_tar(info: ImageInfo, desc: dict) -> tarfile.TarFile:
    raw = info.blob_path(desc["digest"]).read_bytes()
    if desc["mediaType"].endswith("zstd"):
        raw = zstandard.ZstdDecompressor().decompress(raw)
    elif desc["mediaType"].endswith("gzip"):
        raw = gzip.decompress(raw)
    return tarfile.open(fileobj=io.BytesIO(raw))


def test_expected_images(built: dict[str, ImageInfo]) -> None:
    assert set(built) == {
        "busybox", "layered", "multiarch", "foreign", "foreign-manifest", "users-numeric",
        "users-name", "users-namegroup", "config", "zstd", "docker-schema2", "docker-list",
        "evil-dotdot", "evil-abs", "evil-symlink"}
    assert built["busybox"].tags == ["latest", "1", "stable"]
    assert all(i.repository == f"crib-test/{n}" for n, i in built.items())
    ids = [i.config_digest for i in built.values() if i.config_digest]
    assert len(ids) == len(set(ids)), "every image has its own id"


def test_deterministic_and_cached(built: dict[str, ImageInfo], tmp_path: Path) -> None:
    again = build_all(tmp_path)
    for name, info in built.items():
        assert again[name].manifest_digest == info.manifest_digest, name
        assert again[name].config_digest == info.config_digest, name
    blob = again["busybox"].blob_path(again["busybox"].blobs[1])
    mtime = blob.stat().st_mtime_ns
    warm = build_all(tmp_path)
    assert warm["busybox"] == again["busybox"]
    assert blob.stat().st_mtime_ns == mtime
    blob.unlink()  # a missing blob makes that image rebuild
    assert build_all(tmp_path)["busybox"].manifest_digest == again["busybox"].manifest_digest
    assert blob.exists()


def test_busybox_content(built: dict[str, ImageInfo]) -> None:
    info = built["busybox"]
    config = config_of(info)
    assert config["config"]["Cmd"] == ["sh"]
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    tree = load_tree(info.tree_path)  # type: ignore[arg-type]
    assert tree["/bin/sh"] == {"type": "symlink", "target": "busybox", "uid": 0, "gid": 0}
    assert tree["/bin/busybox"]["mode"] == 0o755
    assert tree["/tmp"]["mode"] == 0o1777
    with layer_tar(info, manifest_of(info)["layers"][0]) as tar:
        passwd = tar.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        group = tar.extractfile("etc/group").read().decode()  # type: ignore[union-attr]
    assert "app:x:1000:1000:" in passwd and passwd.startswith("root:x:0:0:")
    assert "nobody:x:65534:" in passwd
    assert "extra:x:2000:app" in group and "app:x:1000:" in group
    assert info.uncompressed_size == sum(
        len(gzip.decompress(info.blob_path(d["digest"]).read_bytes()))
        for d in manifest_of(info)["layers"])


def test_layered_tree(built: dict[str, ImageInfo]) -> None:
    info = built["layered"]
    assert len(manifest_of(info)["layers"]) == 4
    tree = load_tree(info.tree_path)  # type: ignore[arg-type]
    data = sorted(p for p in tree if p.startswith("/data/"))
    assert "/bin/vi" not in tree and "/bin/sh" in tree
    assert tree["/data/remove-me.txt"]["mode"] == 0o600  # whited out, then re-added
    assert [p for p in data if p.startswith("/data/dir-to-remove")] == [
        "/data/dir-to-remove", "/data/dir-to-remove/fresh.txt"]
    assert [p for p in data if p.startswith("/data/opaque")] == [
        "/data/opaque", "/data/opaque/new.txt"]
    assert tree["/data/owned.txt"] | {"sha256": ""} == {
        "type": "file", "mode": 0o640, "uid": 1000, "gid": 1000, "size": 24, "sha256": ""}
    assert tree["/data/xattr.txt"]["xattrs"] == {"user.crib.test": "hello-xattr"}
    assert tree["/data/hardlink-dst.txt"]["hardlink_to"] == "/data/hardlink-src.txt"
    assert tree["/data/symlink"]["target"] == "keep.txt"
    assert tree["/data/setuid"]["mode"] == 0o4755
    assert tree["/opt/devices/null"] == {"type": "char", "mode": 0o666, "uid": 0, "gid": 0,
                                         "major": 1, "minor": 3}
    assert tree["/data/replace-me.txt"]["size"] == len("version 2\n")


def test_multiarch_and_foreign(built: dict[str, ImageInfo]) -> None:
    multi = built["multiarch"]
    assert multi.media_type == model.OCI_INDEX
    assert set(multi.platforms) == {"linux/amd64", "linux/arm64"}
    assert multi.config_digest == multi.platforms["linux/amd64"].config_digest
    arm = config_of(multi, multi.platforms["linux/arm64"].manifest_digest)
    assert arm["architecture"] == "arm64"
    assert load_tree(multi.tree_path)["/arch"]["size"] == len("amd64\n")  # type: ignore[arg-type]
    foreign = built["foreign"]
    assert set(foreign.platforms) == {"linux/s390x"} and foreign.config_digest is None
    assert built["foreign-manifest"].media_type == model.OCI_MANIFEST


def test_users_and_config(built: dict[str, ImageInfo]) -> None:
    users = {n: config_of(built[n])["config"]["User"]
             for n in ("users-numeric", "users-name", "users-namegroup")}
    assert users == {"users-numeric": "1000", "users-name": "app",
                     "users-namegroup": "app:extra"}
    cfg = config_of(built["config"])["config"]
    assert cfg["Entrypoint"] == ["/bin/sh", "-c"] and cfg["Cmd"] == ["echo hello"]
    assert cfg["Env"][0] == "FOO=bar" and cfg["Env"][1].startswith("PATH=")
    assert cfg["WorkingDir"] == "/work" and cfg["StopSignal"] == "SIGUSR1"
    assert cfg["Labels"]["org.crib.test.image"] == "config"
    assert load_tree(built["config"].tree_path)["/work"]["type"] == "dir"  # type: ignore[arg-type]


def test_media_types(built: dict[str, ImageInfo]) -> None:
    zstd = manifest_of(built["zstd"])
    assert {d["mediaType"] for d in zstd["layers"]} == {model.OCI_LAYER_ZSTD}
    with layer_tar(built["zstd"], zstd["layers"][1]) as tar:
        assert tar.getnames() == ["zstd.txt"]
    schema2 = manifest_of(built["docker-schema2"])
    assert schema2["mediaType"] == model.DOCKER_MANIFEST
    assert schema2["config"]["mediaType"] == model.DOCKER_CONFIG
    assert {d["mediaType"] for d in schema2["layers"]} == {model.DOCKER_LAYER_GZIP}
    docker_list = built["docker-list"]
    assert docker_list.media_type == model.DOCKER_LIST
    assert manifest_of(docker_list, docker_list.child_manifests[0])["mediaType"] == \
        model.DOCKER_MANIFEST


def test_evil_layers(built: dict[str, ImageInfo]) -> None:
    for name, member in [("evil-dotdot", "../crib-evil-dotdot-escape"),
                         ("evil-abs", "/tmp/crib-evil-abs-escape"),
                         ("evil-symlink", "escape-rel/crib-evil-symlink-rel-escape")]:
        info = built[name]
        assert info.tree_path is None
        with layer_tar(info, manifest_of(info)["layers"][0]) as tar:
            assert member in tar.getnames(), name


def test_bad_digest_replacement_keeps_length(tmp_path: Path) -> None:
    info = build_image("bad-digest", tmp_path)
    layer = info.notes["corrupt_layer"]
    original = info.blob_path(layer).read_bytes()
    replacement = corrupted_layer_bytes()
    assert len(replacement) == len(original) and replacement != original
    with tarfile.open(fileobj=io.BytesIO(replacement)) as tar:
        assert tar.getnames() == ["bad-digest.txt"]


def test_oci_layout_index(built: dict[str, ImageInfo]) -> None:
    cache = built["busybox"].cache_dir
    index = json.loads((cache / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert {"crib-test/busybox:latest", "crib-test/busybox:stable",
            "crib-test/multiarch:latest"} <= names
    assert json.loads((cache / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
