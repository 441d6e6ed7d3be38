"""Pulls that go wrong, and pulls that many clients share, through a real daemon.

A throttling TCP relay (below) slows the registry down so that deadlines and
cancellations land in the middle of a download; the auth proxy counts blob
fetches and injects cuts and failures.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from api import api_pb2
from hack.testimages import BadDigest, ImageInfo
from hack.testimages.catalog import (
    EVIL_ABS_HOST_PATH,
    EVIL_DOTDOT_NAME,
    EVIL_SYMLINK_HOST_PATH,
    EVIL_SYMLINK_REL_HOST_PATH,
)
from tests.integration.authproxy import AuthProxy
from tests.integration.conftest import ImageCrib, SeededRegistry
from tests.integration.daemon import Daemon, assert_clean_exit
from tests.integration.registry import free_port
from tests.integration.test_images_pull import (
    assert_store_consistent,
    files_under,
    list_images,
    pull,
    status,
    store,
)

pytestmark = pytest.mark.integration


class Relay:
    """A TCP relay on 127.0.0.1 that sends the upstream's answers at ``rate`` bytes/s."""

    def __init__(self, upstream: str, rate: int) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self._spawn(self._accept)

    def _spawn(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self.lock:
            self.threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, server]
            self._spawn(self._pump, client, server, 0)
            self._spawn(self._pump, server, client, self.rate)

    def _pump(self, src: socket.socket, dst: socket.socket, rate: int) -> None:
        chunk = max(1024, rate // 20) if rate else 65536
        with contextlib.suppress(OSError):
            while not self.closed.is_set():
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        with self.lock:
            sockets, threads = list(self.sockets), list(self.threads)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "relay thread did not stop"

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pull_error(d: Daemon, ref: str, timeout: float = 120) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        pull(d, ref, timeout=timeout)
    return err.value


def assert_nothing_stored(d: Daemon) -> None:
    root = store(d)
    assert list_images(d) == []
    assert files_under(root / "blobs") == []
    assert list((root / "layers").iterdir()) == []
    assert list((root / "tmp").iterdir()) == []


def eventually(check: Callable[[], None], deadline: float = 30.0) -> None:
    """Retry ``check`` until it passes (cleanup after a cancelled pull runs in the daemon)."""
    end = time.monotonic() + deadline
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


# -- registry errors -----------------------------------------------------------------------


def test_registry_not_listening(image_crib: ImageCrib) -> None:
    dead = f"127.0.0.1:{free_port()}"
    d = image_crib(insecure=[dead], pull_retries=1)
    err = pull_error(d, f"{dead}/crib-test/busybox:latest")
    assert str(err.details()).startswith("RegistryUnavailable"), err.details()
    assert dead in str(err.details()) and "connection refused" in str(err.details())
    assert_nothing_stored(d)


def test_unknown_tag_and_repository_are_not_found(image_crib: ImageCrib,
                                                  test_registry: SeededRegistry) -> None:
    d = image_crib()
    for ref in (test_registry.ref("busybox", "no-such-tag"),
                f"{test_registry.address}/crib-test/no-such-image:latest",
                f"{test_registry.address}/crib-test/busybox@sha256:{'ab' * 32}"):
        err = pull_error(d, ref)
        assert err.code() == grpc.StatusCode.NOT_FOUND, (ref, err.details())
        assert "not found" in str(err.details())
    assert_nothing_stored(d)


def test_invalid_references_are_refused(image_crib: ImageCrib) -> None:
    d = image_crib()
    for ref in ("library/BusyBox", "a b", "busybox:" + "x" * 200, "http://x/y"):
        err = pull_error(d, ref)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, ref
        assert "invalid image reference" in str(err.details())


def test_blob_that_does_not_match_its_digest(image_crib: ImageCrib,
                                             bad_digest_image: BadDigest,
                                             test_registry: SeededRegistry) -> None:
    d = image_crib()
    err = pull_error(d, bad_digest_image.info.reference(test_registry.address))
    assert err.code() == grpc.StatusCode.DATA_LOSS, err.details()
    assert bad_digest_image.corrupted_digest in str(err.details())
    assert_nothing_stored(d)


def test_transient_failures_are_retried(image_crib: ImageCrib,
                                        test_registry: SeededRegistry) -> None:
    info = test_registry.images["layered"]
    with AuthProxy(test_registry.address) as proxy:
        d = image_crib(insecure=[proxy.address])
        layer = info.blobs[1]  # the busybox base layer, ~1 MB
        proxy.cut_blob(layer, after_bytes=300_000, times=2)
        proxy.fail_first(2, status=503, path_prefix=f"/v2/{info.repository}/manifests/")
        assert pull(d, f"{proxy.address}/{info.repository}:latest") == info.config_digest
        assert proxy.count(status=503) == 2
        assert proxy.blob_fetches(layer) == 3  # two cut bodies, then the rest with Range
        assert proxy.count(method="GET", status=206) >= 1
        assert_store_consistent(d)


def test_connection_cut_every_time_fails_cleanly(image_crib: ImageCrib,
                                                 test_registry: SeededRegistry) -> None:
    info = test_registry.images["busybox"]
    with AuthProxy(test_registry.address) as proxy:
        d = image_crib(insecure=[proxy.address], pull_retries=1)
        proxy.cut_blob(info.blobs[1], after_bytes=10_000, times=100)
        err = pull_error(d, f"{proxy.address}/{info.repository}:latest")
        assert str(err.details()).startswith("RegistryUnavailable"), err.details()
        assert info.blobs[1] in str(err.details())
        assert_nothing_stored(d)


# -- evil layers ---------------------------------------------------------------------------


EVIL_PATHS = [Path(EVIL_ABS_HOST_PATH), Path(EVIL_SYMLINK_HOST_PATH),
              Path(EVIL_SYMLINK_REL_HOST_PATH)]


@pytest.mark.parametrize("name", ["evil-dotdot", "evil-symlink"])
def test_escaping_layers_are_refused(image_crib: ImageCrib, test_registry: SeededRegistry,
                                     tmp_path: Path, name: str) -> None:
    assert not any(p.exists() for p in EVIL_PATHS), "leftover from an earlier run"
    d = image_crib()
    err = pull_error(d, test_registry.ref(name))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert_nothing_stored(d)
    assert not any(p.exists() for p in EVIL_PATHS)
    assert list(tmp_path.rglob(EVIL_DOTDOT_NAME)) == []
    assert list(tmp_path.rglob("crib-evil-*")) == []


def test_absolute_names_stay_inside_the_layer(image_crib: ImageCrib,
                                              test_registry: SeededRegistry) -> None:
    d = image_crib()
    pull(d, test_registry.ref("evil-abs"))
    assert not Path(EVIL_ABS_HOST_PATH).exists()
    inside = list((store(d) / "layers").glob("*/diff" + EVIL_ABS_HOST_PATH))
    assert len(inside) == 1


# -- cancellation, deadlines, sharing ------------------------------------------------------


def test_deadline_mid_pull_leaves_no_partial_files(image_crib: ImageCrib,
                                                   test_registry: SeededRegistry,
                                                   big_image: ImageInfo) -> None:
    with Relay(test_registry.address, rate=4 << 20) as relay:
        d = image_crib(insecure=[relay.address])
        ref = f"{relay.address}/{big_image.repository}:latest"
        err = pull_error(d, ref, timeout=2.0)
        assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        eventually(lambda: assert_nothing_stored(d))
    assert "nobody waits for the pull" in d.log.read_text()


def test_cancelled_pull_stops_and_cleans_up(image_crib: ImageCrib,
                                            test_registry: SeededRegistry) -> None:
    info = test_registry.images["busybox"]
    with AuthProxy(test_registry.address) as proxy, Relay(proxy.address, rate=200_000) as relay:
        d = image_crib(insecure=[relay.address])
        req = api_pb2.PullImageRequest(
            image=api_pb2.ImageSpec(image=f"{relay.address}/{info.repository}:latest"))
        call = d.images.PullImage.future(req, timeout=60)
        eventually(lambda: assert_fetching(store(d)))
        call.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        eventually(lambda: assert_nothing_stored(d))


def assert_fetching(root: Path) -> None:
    assert any(p.name.startswith("ingest-") for p in (root / "tmp").iterdir())


def test_shared_pull_continues_for_a_client_still_waiting(image_crib: ImageCrib,
                                                          test_registry: SeededRegistry) -> None:
    info = test_registry.images["busybox"]
    with AuthProxy(test_registry.address) as proxy, Relay(proxy.address, rate=400_000) as relay:
        d = image_crib(insecure=[relay.address])
        ref = f"{relay.address}/{info.repository}:latest"
        patient = d.images.PullImage.future(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120)
        eventually(lambda: assert_fetching(store(d)))
        err = pull_error(d, ref, timeout=0.5)  # joins, then gives up
        assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
        assert patient.result().image_ref == info.config_digest
        for digest in info.blobs:
            assert proxy.blob_fetches(digest) == 1, digest
        assert_store_consistent(d)


def test_ten_concurrent_pulls_fetch_each_blob_once(image_crib: ImageCrib,
                                                   test_registry: SeededRegistry) -> None:
    info = test_registry.images["layered"]
    with AuthProxy(test_registry.address) as proxy, Relay(proxy.address, rate=2 << 20) as relay:
        d = image_crib(insecure=[relay.address])
        ref = f"{relay.address}/{info.repository}:latest"
        barrier = threading.Barrier(10)
        results: list[str] = []

        def one() -> None:
            barrier.wait()
            results.append(pull(d, ref))

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == [info.config_digest] * 10
        for digest in info.blobs:
            assert proxy.blob_fetches(digest) == 1, digest
        assert proxy.count(path=f"/v2/{info.repository}/manifests/latest") == 1
        assert len(list_images(d)) == 1
        assert "joining the pull already in progress" in d.log.read_text()


# -- a full disk ---------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_full_disk_fails_cleanly_and_the_store_stays_usable(
        image_crib: ImageCrib, test_registry: SeededRegistry, big_image: ImageInfo,
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small-root", "20m") as root:
        d = image_crib(root=root)
        try:
            err = pull_error(d, test_registry.ref("big"))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "no space left" in str(err.details())
            eventually(lambda: assert_nothing_stored(d))
            busybox = test_registry.images["busybox"]
            assert pull(d, test_registry.ref("busybox")) == busybox.config_digest
            assert status(d, busybox.config_digest).image.id == busybox.config_digest
            assert_store_consistent(d)
        finally:
            assert_clean_exit(d, d.stop())
    assert not os.path.ismount(tmp_path / "small-root")
