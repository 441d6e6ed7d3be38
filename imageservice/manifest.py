"""Manifests as a registry serves them: media types, decoding, digest checks.

Accepted: OCI image index and manifest, Docker manifest list and schema 2
manifest.  Docker schema 1 (``…manifest.v1+json`` / ``+prettyjws``, or a body
with ``schemaVersion: 1``) is refused with :class:`ManifestUnsupported`, as
are manifests whose config is not a container image config (artifacts).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from cri.errors import CribError, FailedPrecondition, InvalidArgument
from imageservice.reference import split_digest, validate_digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_MANIFEST_TYPES
IMAGE_CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])


class ManifestUnsupported(FailedPrecondition):
    """A manifest crib cannot use (schema 1, not an image, malformed)."""


class DigestMismatch(CribError):
    """Content does not match the digest or size it was announced with."""

    code = grpc.StatusCode.DATA_LOSS


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, Mapping):
            raise ManifestUnsupported(f"invalid descriptor in {where}: not an object")
        media_type, digest, size = obj.get("mediaType", ""), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not isinstance(digest, str):
            raise ManifestUnsupported(f"invalid descriptor in {where}: bad mediaType or digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestUnsupported(f"invalid descriptor {digest} in {where}: bad size {size!r}")
        try:
            validate_digest(digest)
        except InvalidArgument as exc:
            raise ManifestUnsupported(f"invalid descriptor in {where}: {exc.message}") from None
        urls = obj.get("urls") or ()
        return cls(media_type, digest, size, tuple(u for u in urls if isinstance(u, str)))


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    data: bytes = field(repr=False)
    document: Mapping[str, Any] = field(repr=False, compare=False)

    selectable_types = MANIFEST_TYPES

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def manifests(self) -> Sequence[Mapping[str, Any]]:
        """An index's entries (only the well-formed objects)."""
        entries = self.document.get("manifests") or []
        return [e for e in entries if isinstance(e, Mapping)] if isinstance(entries, list) else []


@dataclass(frozen=True)
class ResolvedImage:
    """What a reference resolved to, for one platform."""

    digest: str  # of the top-level manifest or index: the repo digest to record
    index: Manifest | None
    manifest: Manifest  # the platform's image manifest
    config: Descriptor
    layers: tuple[Descriptor, ...]
    config_data: bytes = field(repr=False)  # the config blob, digest-verified

    def config_json(self) -> Mapping[str, Any]:
        doc = json.loads(self.config_data)
        if not isinstance(doc, dict):
            raise ManifestUnsupported(f"image config {self.config.digest} is not a JSON object")
        return doc


def image_manifest_parts(manifest: Manifest) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """(config, layers) of an image manifest; ManifestUnsupported for non-images."""
    where = f"manifest {manifest.digest}"
    config = Descriptor.from_json(manifest.document.get("config"), where)
    if config.media_type not in IMAGE_CONFIG_TYPES:
        raise ManifestUnsupported(
            f"{where} is not a container image (config media type {config.media_type!r})"
        )
    raw_layers = manifest.document.get("layers") or []
    if not isinstance(raw_layers, list):
        raise ManifestUnsupported(f"{where}: 'layers' is not a list")
    return config, tuple(Descriptor.from_json(layer, where) for layer in raw_layers)


def _guess_type(content_type: str, doc: Mapping[str, Any]) -> str | None:
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared in MANIFEST_TYPES:
        return declared  # the body is digest-verified; the header is not
    if content_type in MANIFEST_TYPES:
        return content_type
    if isinstance(doc.get("manifests"), list):
        return OCI_INDEX
    if isinstance(doc.get("config"), Mapping) and isinstance(doc.get("layers"), list):
        return OCI_MANIFEST
    return None


def decode_manifest(
    data: bytes, content_type: str, ref: str, header_digest: str, where: str
) -> Manifest:
    """Check and decode a manifest body fetched for ``ref`` (a tag or a digest).

    Verifies the bytes against ``ref`` when it is a digest, and against the
    ``Docker-Content-Digest`` header when the registry sent one.
    """
    content_type = content_type.split(";", 1)[0].strip().lower()
    if content_type in SCHEMA1_TYPES:
        raise _schema1(where, content_type)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ManifestUnsupported(f"manifest {where} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestUnsupported(f"manifest {where} is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise _schema1(where, content_type or "schemaVersion 1")
    media_type = _guess_type(content_type, doc)
    if media_type is None:
        raise ManifestUnsupported(
            f"manifest {where} has unsupported media type {content_type or doc.get('mediaType')!r}"
        )
    by_digest = ":" in ref
    expected = ref if by_digest else ""
    if by_digest:
        algorithm, _ = split_digest(ref)
        actual = digest_of(data, algorithm)
        if actual != ref:
            raise DigestMismatch(f"manifest {where}: content has digest {actual}")
    if header_digest:
        try:
            algorithm, _ = split_digest(header_digest)
        except InvalidArgument:
            algorithm = ""
        if algorithm:
            actual = digest_of(data, algorithm)
            if actual != header_digest:
                raise DigestMismatch(
                    f"manifest {where}: Docker-Content-Digest says {header_digest},"
                    f" content has digest {actual}"
                )
    digest = expected or digest_of(data)
    return Manifest(media_type, digest, data, doc)


def _schema1(where: str, what: str) -> ManifestUnsupported:
    return ManifestUnsupported(
        f"manifest {where} is Docker image manifest schema 1 ({what}), which crib does not"
        " support: push the image again with a current client (schema 2 or OCI)"
    )
