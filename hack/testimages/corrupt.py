"""Registry states that cannot be pushed: a blob whose bytes do not match its digest.

A registry verifies digests on upload, so the bad-digest image is pushed
intact and its one layer is then overwritten in the registry's filesystem
storage. Debian's docker-registry (distribution 2.8, filesystem driver) keeps a
blob's bytes at ``<rootdirectory>/docker/registry/v2/blobs/sha256/<first two
hex>/<hex>/data`` and serves that file as it is on GET.

The replacement is a valid, uncompressed tar of exactly the same length (the
file inside says something else), so only a client that verifies the digest
while streaming notices; Content-Length and the tar format stay correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hack.testimages.build import build_image
from hack.testimages.catalog import BAD_DIGEST_CONTENT, bad_digest_layer_entries
from hack.testimages.model import ImageInfo
from hack.testimages.push import push_all
from hack.testimages.tarlayer import build_tar, sha256_digest


@dataclass(frozen=True)
class BadDigest:
    info: ImageInfo
    corrupted_digest: str  # the layer whose stored bytes no longer match
    served_digest: str  # the sha256 of what the registry now serves for it


def registry_blob_path(storage_root: Path, digest: str) -> Path:
    """Where docker-registry's filesystem driver stores ``digest``'s bytes."""
    algo, _, hexpart = digest.partition(":")
    return storage_root / "docker" / "registry" / "v2" / "blobs" / algo / hexpart[:2] / hexpart \
        / "data"


def corrupt_blob(storage_root: Path, digest: str, replacement: bytes) -> Path:
    """Overwrite the stored bytes of ``digest`` in place; returns the data file's path."""
    path = registry_blob_path(storage_root, digest)
    if not path.is_file():
        raise FileNotFoundError(f"blob {digest} is not in the registry storage at {path}")
    path.write_bytes(replacement)
    return path


def corrupted_layer_bytes() -> bytes:
    """A tar of the same length as the bad-digest layer, with different file content."""
    original = BAD_DIGEST_CONTENT
    other = ("CORRUPTED " * len(original))[: len(original) - 1] + "\n"
    return build_tar(bad_digest_layer_entries(other))


def make_bad_digest(registry: str, storage_root: Path, cache_dir: Path | str | None = None,
                    auth: tuple[str, str] | None = None) -> BadDigest:
    """Push crib-test/bad-digest:latest to ``registry`` and corrupt its layer on disk.

    ``storage_root`` is the registry's ``storage.filesystem.rootdirectory``.
    """
    info = build_image("bad-digest", cache_dir)
    push_all(registry, [info], auth=auth)
    digest = info.notes["corrupt_layer"]
    replacement = corrupted_layer_bytes()
    if len(replacement) != info.blob_path(digest).stat().st_size:
        raise AssertionError("corrupted bad-digest layer must keep the original length")
    corrupt_blob(storage_root, digest, replacement)
    return BadDigest(info, digest, sha256_digest(replacement))
