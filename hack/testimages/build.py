"""Build the test images into the cache, rebuilding only what changed.

Cache layout (an OCI image layout plus records)::

    <cache>/oci-layout, index.json     OCI image layout (ref.name = "crib-test/NAME:TAG")
    <cache>/blobs/sha256/<hex>         layers, configs, manifests, indexes
    <cache>/images/NAME.json           ImageInfo record with its input fingerprint
    <cache>/images/NAME.tree.json      expected final tree (see tree.py)

An image is rebuilt when its fingerprint (this package's source, the busybox
binary, the recipe name) differs from its record's or a blob is missing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hack.testimages import model
from hack.testimages.catalog import RECIPES
from hack.testimages.compose import BlobStore, Builder, BuiltImage, canonical_json, file_sha256
from hack.testimages.model import ImageInfo, PlatformManifest
from hack.testimages.rootfs import busybox_path
from hack.testimages.tree import build_tree, write_tree

FORMAT_VERSION = "1"


def _inputs_digest() -> str:
    """Digest of everything an image's bytes depend on, apart from its name."""
    h = hashlib.sha256(FORMAT_VERSION.encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(file_sha256(busybox_path()).encode())
    return h.hexdigest()


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / "images" / f"{name}.json"


def _load_valid(cache_dir: Path, name: str, fingerprint: str) -> ImageInfo | None:
    path = _record_path(cache_dir, name)
    try:
        info = ImageInfo.from_json(json.loads(path.read_text()), cache_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if info.fingerprint != fingerprint:
        return None
    needed = [info.manifest_digest, *info.child_manifests, *info.blobs]
    if not all(info.blob_path(d).is_file() for d in needed):
        return None
    if info.tree_path is not None and not info.tree_path.is_file():
        return None
    return info


def _to_info(name: str, built: BuiltImage, cache_dir: Path, fingerprint: str) -> ImageInfo:
    platforms = {
        m.descriptor.platform or "": PlatformManifest(
            platform=m.descriptor.platform or "", manifest_digest=m.descriptor.digest,
            media_type=m.descriptor.media_type, config_digest=m.config_digest,
            uncompressed_size=m.uncompressed_size)
        for m in built.manifests
    }
    host = next((m for m in built.manifests if m.descriptor.platform == model.host_platform()),
                None)
    is_index = built.top.media_type in model.INDEX_TYPES
    blobs: list[str] = []
    for m in built.manifests:
        blobs.extend(d for d in m.blobs if d not in blobs)
    tree_path = None
    tree_source = host or (built.manifests[0] if len(built.manifests) == 1 else None)
    if built.with_tree and tree_source is not None:
        tree_path = cache_dir / "images" / f"{name}.tree.json"
        write_tree(build_tree(layer.entries for layer in tree_source.layers), tree_path)
    return ImageInfo(
        name=name,
        repository=model.REPOSITORY_PREFIX + name,
        tags=list(built.tags),
        media_type=built.top.media_type,
        manifest_digest=built.top.digest,
        config_digest=host.config_digest if host else None,
        uncompressed_size=(host or built.manifests[0]).uncompressed_size,
        platforms=platforms,
        blobs=blobs,
        child_manifests=[m.descriptor.digest for m in built.manifests] if is_index else [],
        tree_path=tree_path,
        fingerprint=fingerprint,
        cache_dir=cache_dir,
        notes=dict(built.notes),
    )


def _write_json_atomic(path: Path, doc: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _build(cache_dir: Path, names: list[str], inputs: str) -> dict[str, ImageInfo]:
    builder = Builder(BlobStore(cache_dir))
    (cache_dir / "images").mkdir(parents=True, exist_ok=True)
    infos: dict[str, ImageInfo] = {}
    for name in names:
        if name not in RECIPES:
            raise KeyError(f"unknown test image {name!r}; known: {', '.join(RECIPES)}")
        fingerprint = hashlib.sha256(f"{inputs}\n{name}".encode()).hexdigest()
        info = _load_valid(cache_dir, name, fingerprint)
        if info is None:
            info = _to_info(name, RECIPES[name].build(builder), cache_dir, fingerprint)
            _write_json_atomic(_record_path(cache_dir, name), info.to_json())
        infos[name] = info
    _write_layout(cache_dir)
    return infos


def _write_layout(cache_dir: Path) -> None:
    """oci-layout and index.json naming every recorded image by its tags."""
    manifests = []
    for record in sorted((cache_dir / "images").glob("*.json")):
        if record.name.endswith(".tree.json"):
            continue
        try:
            info = ImageInfo.from_json(json.loads(record.read_text()), cache_dir)
        except (OSError, ValueError, TypeError, KeyError):
            continue
        size = info.blob_path(info.manifest_digest).stat().st_size
        for tag in info.tags:
            manifests.append({
                "mediaType": info.media_type, "digest": info.manifest_digest, "size": size,
                "annotations": {"org.opencontainers.image.ref.name": f"{info.repository}:{tag}"},
            })
    (cache_dir / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    _write_json_atomic(cache_dir / "index.json", {"schemaVersion": 2,
                                                  "mediaType": model.OCI_INDEX,
                                                  "manifests": manifests})


def _cache(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else model.default_cache_dir()


def build_all(cache_dir: Path | str | None = None, big: bool = False) -> dict[str, ImageInfo]:
    """Build (or reuse) every default image, plus ``big`` when asked; keyed by name."""
    names = [n for n, r in RECIPES.items() if r.default or (big and n == "big")]
    return build_images(names, cache_dir)


def build_images(names: list[str], cache_dir: Path | str | None = None) -> dict[str, ImageInfo]:
    """Build (or reuse) the named images, including non-default ones (big, bad-digest)."""
    cache = _cache(cache_dir)
    inputs = _inputs_digest()
    with _locked(cache):
        return _build(cache, names, inputs)


def build_image(name: str, cache_dir: Path | str | None = None) -> ImageInfo:
    return build_images([name], cache_dir)[name]
