"""The image manager: the stores under ``<root>/images`` and what the RPCs do with them.

- lookup by id (full, bare hex, a unique prefix of 12+ hex digits), repo tag,
  repo digest, or any reference that normalises to one (``busybox`` means
  ``docker.io/library/busybox:latest``; a short name also matches every name
  registries.conf's search list and aliases turn it into);
- pull (see pull.py), list, remove, disk usage;
- removal: by id or digest the image goes; by tag only that tag goes while the
  image has other tags (CRI-O's UntagImage; containerd removes the whole
  image whatever the reference); when the image goes, every blob and unpacked
  layer that no other image uses goes with it; an image a container uses is
  refused through the ``set_in_use`` hook;
- start-up: temp files of interrupted work and content no image references
  (left by a crash) are removed before the first pull;
- ``reload(image)`` (SIGHUP) applies a new ``[image]`` table: it re-reads
  registries.conf (+ drop-ins) and the auth file, and takes the new pull
  timeouts, retries, download parallelism and pinned-image patterns; a table
  whose files cannot be read is refused whole and the previous one kept;
- pinning: ``is_pinned(record)`` matches ``image.pinned_images`` (pinning.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cri.config import Config, ImageConfig
from cri.errors import CribError, FailedPrecondition, InvalidArgument, NotFound
from imageservice import registries
from imageservice.auth import AuthFile, Credentials
from imageservice.content import ContentStore
from imageservice.index import ImageIndex, ImageRecord
from imageservice.layers import LayerStore
from imageservice.pinning import PinnedImages
from imageservice.pull import Policy, Puller, PullResult, Stores
from imageservice.reference import parse_image_id, parse_reference
from imageservice.registries import RegistriesConfig

if TYPE_CHECKING:
    from imageservice.registry import RegistryClient

log = logging.getLogger(__name__)

InUse = Callable[[str], bool]


@dataclass(frozen=True)
class _Loaded:
    policy: Policy
    fingerprint: str  # of the auth file's bytes, to tell whether it changed


def load_policy(cfg: ImageConfig) -> _Loaded:
    """registries.conf (+ drop-ins) and the auth file; raises CribError when unreadable."""
    regs = registries.load(Path(cfg.registries_conf), Path(cfg.registries_conf_dir),
                           cfg.insecure_registries)
    fingerprint = ""
    auth = AuthFile({})
    if cfg.auth_file:
        path = Path(cfg.auth_file)
        try:
            fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            fingerprint = "absent"
        except OSError as exc:
            raise InvalidArgument(f"cannot read auth file {path}: {exc.strerror}") from None
        auth = AuthFile.load(path)
    return _Loaded(Policy(regs, auth), fingerprint)


def describe_changes(old: RegistriesConfig, new: RegistriesConfig) -> list[str]:
    """Human lines for what a registries.conf reload changed."""
    changes: list[str] = []
    before = {t.prefix: t for t in old.registries}
    after = {t.prefix: t for t in new.registries}
    for prefix in sorted(before.keys() - after.keys()):
        changes.append(f"registry {prefix!r} removed")
    for prefix in sorted(after.keys() - before.keys()):
        table = after[prefix]
        mirrors = ", ".join(m.location for m in table.mirrors) or "none"
        changes.append(f"registry {prefix!r} added (location {table.location!r}, "
                       f"mirrors {mirrors}, blocked {table.blocked})")
    for prefix in sorted(before.keys() & after.keys()):
        if before[prefix] != after[prefix]:
            mirrors = ", ".join(m.location for m in after[prefix].mirrors) or "none"
            changes.append(f"registry {prefix!r} changed (location {after[prefix].location!r},"
                           f" mirrors {mirrors}, blocked {after[prefix].blocked})")
    if old.unqualified_search_registries != new.unqualified_search_registries:
        changes.append(f"unqualified-search-registries {old.unqualified_search_registries} -> "
                       f"{new.unqualified_search_registries}")
    if old.short_name_mode != new.short_name_mode:
        changes.append(f"short-name-mode {old.short_name_mode} -> {new.short_name_mode}")
    if old.aliases != new.aliases:
        changes.append(f"aliases changed ({len(old.aliases)} -> {len(new.aliases)})")
    return changes


class ImageManager:
    """Owns the image stores and the puller; see the module docstring."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.image = cfg.image  # the [image] table in force (replaced by reload)
        self.root = Path(cfg.root) / "images"
        self._client: RegistryClient | None = None  # made by the first pull: see `client`
        self.pinned = PinnedImages.compile(cfg.image.pinned_images)
        self._stores: Stores | None = None
        self._puller: Puller | None = None
        self._loaded = _Loaded(Policy(RegistriesConfig(), AuthFile({})), "")
        self._in_use: InUse | None = None

    # --- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        self._stores = await asyncio.to_thread(self._open)
        self._puller = Puller(self._stores, self._registry_client,
                              self.image.max_concurrent_downloads)
        try:
            self._loaded = await asyncio.to_thread(load_policy, self.image)
        except CribError as exc:
            log.error("image pulls disabled until the configuration is fixed: %s", exc.message)
            empty = RegistriesConfig(insecure_registries=list(self.image.insecure_registries))
            self._loaded = _Loaded(Policy(empty, AuthFile({}), exc), "")
        log.info("image store %s: %d image(s)", self.root, len(self._stores.index))

    def _open(self) -> Stores:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        stores = Stores(ContentStore(self.root), LayerStore(self.root), ImageIndex(self.root))
        stores.content.cleanup_tmp()
        stores.layers.cleanup_tmp()
        blobs, chains = stores.index.referenced()
        orphans = [d for d in stores.content.digests() if d not in blobs]
        stale = [m.chain_id for m in stores.layers.all() if m.chain_id not in chains]
        for chain in stale:
            stores.layers.remove(chain)
        for digest in orphans:
            stores.content.delete(digest)
        if orphans or stale:
            log.info("removed %d blob(s) and %d layer(s) that no image uses", len(orphans),
                     len(stale))
        return stores

    async def reload(self, image: ImageConfig | None = None) -> bool:
        """Apply ``image`` (default: the current table, re-reading its files).

        Returns False, keeping everything as it was, when registries.conf, its
        drop-ins or the auth file cannot be read or the pinned patterns are bad.
        """
        new = image if image is not None else self.image
        try:
            pinned = PinnedImages.compile(new.pinned_images)
            loaded = await asyncio.to_thread(load_policy, new)
        except CribError as exc:
            log.error("reload: keeping the previous registries/auth configuration: %s",
                      exc.message)
            return False
        old = self._loaded
        changes = describe_changes(old.policy.registries, loaded.policy.registries)
        if loaded.fingerprint != old.fingerprint or new.auth_file != self.image.auth_file:
            changes.append(f"auth file {new.auth_file or '(none)'} changed")
        if old.policy.error is not None:
            changes.append("the configuration is readable again")
        self._loaded = loaded
        self.image = new
        self.pinned = pinned
        if self._client is not None:
            self._client.progress_timeout = new.pull_progress_timeout
            self._client.max_retries = new.pull_retries
        if self._puller is not None:
            self._puller.max_downloads = new.max_concurrent_downloads
        log.info("reloaded registries configuration (%s): %s", new.registries_conf,
                 "; ".join(changes) if changes else "no changes")
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def _registry_client(self) -> RegistryClient:
        """The registry client, made when the first pull needs it."""
        if self._client is None:
            # Imported here, not at the top: requests/urllib3 (and the ssl, http and
            # email modules under them) cost ~60 ms of start-up and several MiB of
            # idle RSS, and only a pull needs them.
            from imageservice.registry import RegistryClient

            self._client = RegistryClient(progress_timeout=self.image.pull_progress_timeout,
                                          max_retries=self.image.pull_retries)
        return self._client

    @property
    def stores(self) -> Stores:
        if self._stores is None:
            raise FailedPrecondition("the image store is not open yet")
        return self._stores

    @property
    def policy(self) -> Policy:
        return self._loaded.policy

    def set_in_use(self, fn: InUse | None) -> None:
        """Register the containers' check: ``fn(image_id)`` is True while a container uses it."""
        self._in_use = fn

    def is_pinned(self, record: ImageRecord) -> bool:
        """Whether ImageStatus/ListImages report ``record`` pinned (``image.pinned_images``)."""
        return record.pinned or self.pinned.matches(
            record.id, [*record.repo_tags, *record.repo_digests])

    # --- queries --------------------------------------------------------------

    def names_for(self, query: str) -> list[str]:
        """Normalised names ``query`` may be recorded under (empty if it is no reference)."""
        try:
            ref = parse_reference(query)
        except InvalidArgument:
            return []
        names = [ref.canonical().string()]
        if not ref.qualified:
            try:
                sources = self.policy.registries.candidates(query)
            except CribError:
                sources = []
            names += [s.canonical.canonical().string() for s in sources]
        return list(dict.fromkeys(names))

    def find(self, query: str) -> ImageRecord | None:
        """The image ``query`` names, or None."""
        if not query:
            return None
        index = self.stores.index
        found = index.get(query)
        if found is not None:
            return found
        for name in self.names_for(query):
            found = index.get(name)
            if found is not None:
                return found
        return None

    def list_images(self, query: str = "") -> list[ImageRecord]:
        if query:
            found = self.find(query)
            return [found] if found is not None else []
        return sorted(self.stores.index.list(), key=lambda r: (r.created_at, r.id))

    async def usage(self) -> tuple[int, int]:
        """(bytes, inodes) used by the image store: blobs and unpacked layers."""
        stores = self.stores

        def measure() -> tuple[int, int]:
            blob_bytes, blob_inodes = stores.content.usage()
            layer_bytes, layer_inodes = stores.layers.usage()
            return blob_bytes + layer_bytes, blob_inodes + layer_inodes

        return await asyncio.to_thread(measure)

    # --- mutations ------------------------------------------------------------

    async def pull(self, raw: str, credentials: Credentials | None) -> PullResult:
        if self._puller is None:
            raise FailedPrecondition("the image store is not open yet")
        return await self._puller.pull(raw, credentials, self.policy)

    async def remove(self, query: str) -> None:
        """Remove what ``query`` names (see the module docstring); absent is fine."""
        record = self.find(query)
        if record is None:
            log.info("remove %r: no such image", query)
            return
        tag = self._tag_named(query, record)
        if tag is not None and len(record.repo_tags) > 1:
            await asyncio.to_thread(self.stores.index.untag, tag)
            log.info("untagged %s from image %s (still tagged %s)", tag, record.id,
                     ", ".join(t for t in record.repo_tags if t != tag))
            return
        if self._in_use is not None and self._in_use(record.id):
            names = ", ".join(record.repo_tags or record.repo_digests) or "no names"
            raise FailedPrecondition(
                f"image {record.id} ({names}) is in use by a container: remove the container"
                " first")
        await asyncio.to_thread(self._delete, record.id)

    def _tag_named(self, query: str, record: ImageRecord) -> str | None:
        if parse_image_id(query) == record.id or record.id.startswith("sha256:" + query):
            return None
        for name in (query, *self.names_for(query)):
            if name in record.repo_tags:
                return name
        return None

    def _delete(self, image_id: str) -> None:
        stores = self.stores
        try:
            removed = stores.index.remove(image_id)
        except NotFound:
            return  # removed concurrently
        garbage = stores.index.garbage([removed])
        layers = [c for c in garbage.chain_ids if stores.layers.remove(c)]
        blobs = [d for d in garbage.blobs if stores.content.delete(d)]
        log.info("removed image %s (%s): %d layer(s) and %d blob(s) freed", removed.id,
                 ", ".join(removed.repo_tags or removed.repo_digests) or "untagged",
                 len(layers), len(blobs))
