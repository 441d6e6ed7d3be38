"""PullImage, from a reference to a recorded image.

    reference ─ registries.conf ─▶ sources (mirrors first, then the primary; short names)
      ─ resolve at the first source that answers ─▶ index → platform manifest + config
      ─ lease every digest and chain id ─▶ store the manifests and the config
      ─ fetch missing layer blobs in parallel (bounded), each into a verified Ingest
      ─ unpack each layer, in order, as soon as its blob is there (existing chains
        are skipped; the uncompressed digest must equal the config's diff id)
      ─ record the image (id = config digest) ─▶ the image id

Sharing: concurrent pulls of one reference with the same credentials are one
pull (``Shared``); a blob wanted by two different pulls is downloaded once.
Registry I/O and disk work run in threads; a pull that nobody waits for any
more is cancelled, which sets the threads' cancel events (downloads stop at
the next chunk, their temp files are removed).

Failure leaves nothing: whatever this pull added that no recorded image
uses (blobs, unpacked layers) is removed once its threads have finished.
Leases keep a concurrent RemoveImage from collecting what a pull is using.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from cri import metrics, tracing
from cri.errors import Cancelled, CribError, Internal, ResourceExhausted
from imageservice.auth import AuthFile, Credentials
from imageservice.content import ContentStore
from imageservice.index import ImageIndex, ImageRecord
from imageservice.inflight import Shared
from imageservice.layers import LayerMeta, LayerStore, chain_ids
from imageservice.manifest import Descriptor, ManifestUnsupported, ResolvedImage
from imageservice.platform import Platform
from imageservice.registries import PullSource, RegistriesConfig

if TYPE_CHECKING:
    from imageservice.registry import RegistryClient, Repository

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Stores:
    """The three stores under ``<root>/images``."""

    content: ContentStore
    layers: LayerStore
    index: ImageIndex


@dataclass(frozen=True)
class Policy:
    """Where and how to pull: registries.conf and the auth file, as last loaded."""

    registries: RegistriesConfig
    auth_file: AuthFile
    error: CribError | None = None  # a configuration that could not be read

    def credentials(self, source: PullSource, given: Credentials | None) -> Credentials | None:
        """The request's credentials, else the auth file's for the physical location."""
        if given is not None:
            return given
        return self.auth_file.lookup(source.reference.name)


@dataclass(frozen=True)
class PullResult:
    image_id: str
    source: str  # host/path the image came from
    fetched_bytes: int


def disk_error(exc: OSError, what: str) -> CribError:
    """A clean error for a failed disk operation (a full disk is RESOURCE_EXHAUSTED)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: no space left on the image store ({exc.strerror})")
    return Internal(f"{what}: {exc}")


def _guarded(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except OSError as exc:
        raise disk_error(exc, what) from exc


def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """``fn`` in a worker thread, as a future whose failure never goes unretrieved.

    Callers await it through ``asyncio.shield`` so that a cancelled caller does
    not pretend the thread stopped; the thread runs on until it sees its
    cancel event, and whoever cleans up waits for the future.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    fut.add_done_callback(_retrieve)
    return fut


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass
class _Job:
    """One pull's bookkeeping: what it added, and the threads still working for it."""

    created_blobs: set[str] = field(default_factory=set)
    created_chains: set[str] = field(default_factory=set)
    threads: list[asyncio.Future[Any]] = field(default_factory=list)
    fetched: int = 0

    async def thread(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a thread that outlives a cancellation (cleanup waits for it)."""
        fut = _in_thread(_guarded, what, fn, *args)
        self.threads.append(fut)
        return await asyncio.shield(fut)


class Puller:
    """Pulls images into the stores; see the module docstring."""

    def __init__(self, stores: Stores, client: Callable[[], RegistryClient], max_downloads: int,
                 platform: Platform | None = None) -> None:
        self.stores = stores
        self.client = client  # called at each pull: the owner may make the client lazily
        self.max_downloads = max_downloads
        self.platform = platform
        self._pulls: Shared[tuple[str, str], PullResult] = Shared("pull")
        self._blobs: Shared[str, None] = Shared("download")
        self._downloads: dict[str, asyncio.Task[Any]] = {}  # digest -> the task running it

    async def pull(self, raw: str, credentials: Credentials | None, policy: Policy) -> PullResult:
        """Pull ``raw`` (or join the pull of it already running) and return its image id."""
        if policy.error is not None:
            raise policy.error
        sources = policy.registries.candidates(raw)  # InvalidArgument, RegistryBlocked
        key = (_key(sources), credentials.identity() if credentials else "")
        return await self._pulls.run(key, lambda: self._pull(raw, sources, credentials, policy))

    # --- one pull -----------------------------------------------------------

    async def _pull(self, raw: str, sources: list[PullSource], credentials: Credentials | None,
                    policy: Policy) -> PullResult:
        started = time.monotonic()
        job = _Job()
        try:
            with tracing.child_span("image.pull", **{"image.ref": raw}):
                record, repo, layers = await self._pull_into(job, sources, credentials, policy)
        except Exception:
            if metrics.ENABLED:
                metrics.record_pull(job.fetched, time.monotonic() - started, ok=False)
            raise
        elapsed = time.monotonic() - started
        if metrics.ENABLED:
            metrics.record_pull(job.fetched, elapsed, ok=True)
        log.info("pulled %s as %s from %s: %d layer(s), %d bytes fetched in %.2fs",
                 raw, record.id, repo.name, layers, job.fetched, elapsed)
        return PullResult(record.id, repo.name, job.fetched)

    async def _pull_into(self, job: _Job, sources: list[PullSource],
                         credentials: Credentials | None, policy: Policy
                         ) -> tuple[ImageRecord, Repository, int]:
        source, repo, resolved = await self._resolve(sources, credentials, policy)
        config = resolved.config_json()
        diff_ids = _diff_ids(config, resolved)
        chains = chain_ids(diff_ids)
        digests = [resolved.digest, resolved.manifest.digest, resolved.config.digest,
                   *(layer.digest for layer in resolved.layers)]
        try:
            with self.stores.content.lease(digests), self.stores.layers.lease(chains):
                record = await self._store(job, repo, source, resolved, config,
                                           diff_ids, chains)
        except BaseException:
            await self._discard(job)
            raise
        return record, repo, len(chains)

    async def _resolve(self, sources: list[PullSource], credentials: Credentials | None,
                       policy: Policy) -> tuple[PullSource, Repository, ResolvedImage]:
        """The first source that resolves; otherwise the last source's error (with the others')."""
        failures: list[tuple[PullSource, CribError]] = []
        for source in sources:
            repo = self.client().for_source(source, policy.credentials(source, credentials))
            cancel = threading.Event()
            fut = _in_thread(repo.resolve, source.locator, self.platform, cancel=cancel)
            try:
                resolved = await asyncio.shield(fut)
            except asyncio.CancelledError:
                cancel.set()
                raise
            except Cancelled:
                raise
            except CribError as exc:
                log.info("cannot resolve %s at %s: %s", source.canonical, repo.name, exc.message)
                failures.append((source, exc))
                continue
            if source.mirror:
                log.info("pulling %s from mirror %s", source.canonical, repo.name)
            return source, repo, resolved
        raise _combined(failures)

    async def _store(self, job: _Job, repo: Repository, source: PullSource,
                     resolved: ResolvedImage, config: Mapping[str, Any], diff_ids: list[str],
                     chains: list[str]) -> ImageRecord:
        content, layers = self.stores.content, self.stores.layers
        small = {resolved.config.digest: resolved.config_data,
                 resolved.manifest.digest: resolved.manifest.data}
        if resolved.index is not None:
            small[resolved.index.digest] = resolved.index.data
        for digest, data in small.items():
            if not content.has(digest):
                job.created_blobs.add(digest)
                await job.thread(f"storing {digest}", content.write_bytes, digest, data)
        metas = await self._layers(job, repo, resolved.layers, diff_ids, chains)
        canonical = source.canonical.canonical()
        record = ImageRecord(
            id=resolved.config.digest,
            repo_tags=[canonical.string()] if canonical.digest is None else [],
            repo_digests=[canonical.with_digest(resolved.digest).string()],
            size=sum(m.size for m in metas),
            config=dict(config),
            manifest_digest=resolved.manifest.digest,
            chain_ids=list(chains),
            diff_ids=list(diff_ids),
            layer_digests=[layer.digest for layer in resolved.layers],
            layer_media_types=[layer.media_type for layer in resolved.layers],
        )
        missing = [c for c in chains if not layers.has(c)]
        if missing:  # cannot happen while leased; never record an image without its layers
            raise Internal(f"layer {missing[0]} of {record.id} vanished during the pull")
        return await job.thread(f"recording image {record.id}",
                                self.stores.index.add_or_update, record)

    async def _layers(self, job: _Job, repo: Repository, descs: Iterable[Descriptor],
                      diff_ids: list[str], chains: list[str]) -> list[LayerMeta]:
        """Fetch the missing blobs (bounded, in parallel) and unpack in order as they land."""
        content, layers = self.stores.content, self.stores.layers
        limit = asyncio.Semaphore(self.max_downloads)
        descs = list(descs)

        async def fetch(desc: Descriptor) -> None:
            async with limit:
                if content.has(desc.digest):
                    return
                job.created_blobs.add(desc.digest)
                await self._blobs.run(desc.digest, lambda: self._download(repo, desc))
                job.fetched += desc.size

        fetches = [asyncio.ensure_future(fetch(d)) for d in descs]

        async def unpack() -> list[LayerMeta]:
            metas: list[LayerMeta] = []
            parent: str | None = None
            for desc, diff_id, chain, fetched in zip(descs, diff_ids, chains, fetches,
                                                     strict=True):
                await fetched
                meta = layers.get(chain)
                if meta is None:
                    job.created_chains.add(chain)
                    meta = await job.thread(f"unpacking layer {desc.digest}", layers.add,
                                            parent, diff_id, content.path(desc.digest),
                                            desc.media_type)
                metas.append(meta)
                parent = chain
            return metas

        unpacker = asyncio.ensure_future(unpack())
        everything = [unpacker, *fetches]
        try:
            done, _ = await asyncio.wait(everything, return_when=asyncio.FIRST_EXCEPTION)
            for task in (*fetches, unpacker):  # a download's own error before the unpacker's
                if task in done and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return unpacker.result()
        finally:
            for task in everything:
                task.cancel()
            await asyncio.gather(*everything, return_exceptions=True)

    async def _download(self, repo: Repository, desc: Descriptor) -> None:
        """One blob into the content store; stops (and cleans up) when cancelled."""
        me = asyncio.current_task()
        assert me is not None
        self._downloads[desc.digest] = me
        cancel = threading.Event()
        fut = _in_thread(_guarded, f"storing blob {desc.digest}", self._fetch_blob, repo, desc,
                         cancel)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.wait([fut])  # the thread removes its temp file as it stops
            raise
        finally:
            if self._downloads.get(desc.digest) is me:
                del self._downloads[desc.digest]

    def _fetch_blob(self, repo: Repository, desc: Descriptor, cancel: threading.Event) -> None:
        with self.stores.content.ingest(desc.digest, desc.size) as ingest:
            repo.fetch_blob(desc.digest, desc.size, ingest, cancel=cancel)
            ingest.commit()

    async def _discard(self, job: _Job) -> None:
        """After a failure: wait for this pull's threads, then drop what only it added."""
        pending: list[asyncio.Future[Any]] = [f for f in job.threads if not f.done()]
        pending += [t for d, t in self._downloads.items() if d in job.created_blobs]
        if pending:
            await asyncio.wait(pending)
        if job.created_blobs or job.created_chains:
            await asyncio.to_thread(self._collect, job.created_blobs, job.created_chains)

    def _collect(self, blobs: set[str], chains: set[str]) -> None:
        kept_blobs, kept_chains = self.stores.index.referenced()
        for chain in sorted(chains - kept_chains):
            try:
                self.stores.layers.remove(chain)
            except (OSError, CribError) as exc:
                log.warning("cannot remove layer %s of a failed pull: %s", chain, exc)
        for digest in sorted(blobs - kept_blobs):
            try:
                self.stores.content.delete(digest)
            except (OSError, CribError) as exc:
                log.warning("cannot remove blob %s of a failed pull: %s", digest, exc)


def _key(sources: list[PullSource]) -> str:
    """What identifies a pull: the canonical names it may record (mirrors aside)."""
    return " ".join(dict.fromkeys(s.canonical.canonical().string() for s in sources))


def _diff_ids(config: Mapping[str, Any], resolved: ResolvedImage) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    where = f"image config {resolved.config.digest}"
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise ManifestUnsupported(f"{where} has no rootfs.diff_ids list")
    if len(diff_ids) != len(resolved.layers):
        raise ManifestUnsupported(
            f"{where} lists {len(diff_ids)} diff ids but manifest {resolved.manifest.digest}"
            f" has {len(resolved.layers)} layers")
    return list(diff_ids)


def _combined(failures: list[tuple[PullSource, CribError]]) -> CribError:
    """The primary's (last) error; the mirrors' errors appended to its message."""
    _, error = failures[-1]
    if len(failures) > 1:
        others = "; ".join(f"{s.reference.name}: {e.message}" for s, e in failures[:-1])
        error.message = f"{error.message} (also tried {others})"
        error.args = (error.message,)
    return error

