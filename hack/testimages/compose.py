"""Content-addressed blob store and the builder of layers, configs, manifests and indexes.

Everything is serialised canonically (sorted keys, no whitespace) so that the
same inputs give the same digests on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hack.testimages import model
from hack.testimages.tarlayer import Compression, Entry, build_tar, compress, sha256_digest

CREATED = "2024-01-01T00:00:00Z"


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


class BlobStore:
    """``<root>/blobs/sha256/<hex>``: the OCI image layout's content store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"

    def path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algo / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def put(self, data: bytes) -> tuple[str, int]:
        """Store ``data`` (atomically, once) and return (digest, size)."""
        digest = sha256_digest(data)
        target = self.path(digest)
        if not target.is_file():
            self.blobs.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return digest, len(data)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: str | None = None  # "linux/arm64"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.platform:
            os_name, _, arch = self.platform.partition("/")
            doc["platform"] = {"architecture": arch, "os": os_name}
        return doc


@dataclass(frozen=True)
class Layer:
    descriptor: Descriptor
    diff_id: str
    uncompressed_size: int
    entries: tuple[Entry, ...]
    comment: str


@dataclass
class Manifest:
    descriptor: Descriptor  # carries the platform
    config_digest: str
    layers: list[Layer]

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.uncompressed_size for layer in self.layers)

    @property
    def blobs(self) -> list[str]:
        return [self.config_digest] + [layer.descriptor.digest for layer in self.layers]


@dataclass
class BuiltImage:
    """What an image recipe produces: the tagged descriptor and its platform manifests."""

    tags: list[str]
    top: Descriptor
    manifests: list[Manifest]
    with_tree: bool = True
    notes: dict[str, str] = field(default_factory=dict)


_LAYER_TYPES = {
    (Compression.NONE, False): model.OCI_LAYER_TAR,
    (Compression.GZIP, False): model.OCI_LAYER_GZIP,
    (Compression.ZSTD, False): model.OCI_LAYER_ZSTD,
    (Compression.GZIP, True): model.DOCKER_LAYER_GZIP,
}


class Builder:
    """Builds blobs into a BlobStore; compressed layers are memoised per process."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._compressed: dict[tuple[str, Compression, int | None], tuple[str, int]] = {}

    def layer(self, entries: Sequence[Entry], comment: str,
              compression: Compression = Compression.GZIP, docker: bool = False,
              level: int | None = None) -> Layer:
        media_type = _LAYER_TYPES.get((compression, docker))
        if media_type is None:
            raise ValueError(f"no layer media type for {compression.value} (docker={docker})")
        tar = build_tar(entries)
        diff_id = sha256_digest(tar)
        key = (diff_id, compression, level)
        blob = self._compressed.get(key)
        if blob is None:
            blob = self.store.put(compress(tar, compression, level))
            self._compressed[key] = blob
        return Layer(Descriptor(media_type, blob[0], blob[1]), diff_id, len(tar),
                     tuple(entries), comment)

    def image(self, layers: Sequence[Layer], config: dict[str, Any],
              platform: str = "linux/amd64", docker: bool = False) -> Manifest:
        """Write the image config and manifest for ``layers`` (in order, base first)."""
        os_name, _, arch = platform.partition("/")
        image_config = {
            "architecture": arch,
            "os": os_name,
            "created": CREATED,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": CREATED, "created_by": f"crib testimages: {layer.comment}"}
                        for layer in layers],
        }
        config_digest, config_size = self.store.put(canonical_json(image_config))
        config_type = model.DOCKER_CONFIG if docker else model.OCI_CONFIG
        manifest_type = model.DOCKER_MANIFEST if docker else model.OCI_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": Descriptor(config_type, config_digest, config_size).to_json(),
            "layers": [layer.descriptor.to_json() for layer in layers],
        }
        digest, size = self.store.put(canonical_json(manifest))
        return Manifest(Descriptor(manifest_type, digest, size, platform), config_digest,
                        list(layers))

    def index(self, manifests: Sequence[Manifest], docker: bool = False) -> Descriptor:
        index_type = model.DOCKER_LIST if docker else model.OCI_INDEX
        doc = {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [m.descriptor.to_json() for m in manifests],
        }
        digest, size = self.store.put(canonical_json(doc))
        return Descriptor(index_type, digest, size)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
