"""Records describing built test images, and the media types they use."""

from __future__ import annotations

import os
import platform as _platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

REPOSITORY_PREFIX = "crib-test/"
DEFAULT_CACHE_DIR = Path("/var/cache/crib/testimages")
CACHE_ENV = "CRIB_TESTIMAGES_CACHE"

_ARCH_NAMES = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


def host_platform() -> str:
    """This machine's platform in OCI terms, e.g. ``linux/amd64``."""
    machine = _platform.machine()
    return f"linux/{_ARCH_NAMES.get(machine, machine)}"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


@dataclass
class PlatformManifest:
    """One platform's image manifest inside an index (or the only one)."""

    platform: str  # "linux/amd64"
    manifest_digest: str
    media_type: str
    config_digest: str
    uncompressed_size: int  # sum of this platform's uncompressed layer tars


@dataclass
class ImageInfo:
    """A built test image, as stored in the cache and pushed to a registry.

    ``manifest_digest`` is what a tag resolves to (the index digest for index
    images). ``config_digest`` is the CRI image id for the host platform
    (None when the image has no manifest for it). ``blobs`` are all configs and
    layers; ``child_manifests`` are the per-platform manifests of an index,
    pushed by digest before the index.
    """

    name: str
    repository: str
    tags: list[str]
    media_type: str
    manifest_digest: str
    config_digest: str | None
    uncompressed_size: int
    platforms: dict[str, PlatformManifest]
    blobs: list[str]
    child_manifests: list[str] = field(default_factory=list)
    tree_path: Path | None = None
    fingerprint: str = ""
    cache_dir: Path = DEFAULT_CACHE_DIR
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def reference(self, registry: str, tag: str | None = None) -> str:
        """``registry/crib-test/name:tag`` (first tag by default)."""
        return f"{registry}/{self.repository}:{tag or self.tags[0]}"

    def digest_reference(self, registry: str) -> str:
        return f"{registry}/{self.repository}@{self.manifest_digest}"

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return self.cache_dir / "blobs" / algo / hexpart

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["tree_path"] = self.tree_path.name if self.tree_path else None
        del doc["cache_dir"]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], cache_dir: Path) -> ImageInfo:
        fields = dict(doc)
        fields["platforms"] = {k: PlatformManifest(**v) for k, v in doc["platforms"].items()}
        tree = doc.get("tree_path")
        fields["tree_path"] = cache_dir / "images" / tree if tree else None
        fields["cache_dir"] = cache_dir
        return cls(**fields)
