"""Where pulls go and with what credentials: registries.conf, insecure, blocked, auth, SIGHUP.

Proxies (tests/integration/authproxy.py) in front of the session registry count
the requests each location receives, so the tests can tell which one served.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from tests.integration.authproxy import AuthMode, AuthProxy
from tests.integration.conftest import ImageCrib, SeededRegistry
from tests.integration.daemon import Daemon
from tests.integration.registry import free_port
from tests.integration.test_images_pull import pull, status

pytestmark = pytest.mark.integration

USERS = {"alice": "wonderland"}


def mirror_conf(prefix: str, location: str, *mirrors: str, blocked: bool = False) -> str:
    lines = ["[[registry]]", f'prefix = "{prefix}"', f'location = "{location}"',
             "insecure = true", f"blocked = {'true' if blocked else 'false'}"]
    for mirror in mirrors:
        lines += ["[[registry.mirror]]", f'location = "{mirror}"', "insecure = true"]
    return "\n".join(lines) + "\n"


def pull_error(d: Daemon, ref: str, **auth: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        pull(d, ref, 120, **auth)
    return err.value


def served(proxy: AuthProxy) -> int:
    return proxy.count(method="GET", match=lambda r: r.status in (200, 206))


# -- mirrors, short names ------------------------------------------------------------------


def test_mirror_routes_the_pull(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    info = test_registry.images["busybox"]
    with AuthProxy(test_registry.address) as primary, AuthProxy(test_registry.address) as mirror:
        d = image_crib(registries_conf=mirror_conf(primary.address, primary.address,
                                                   mirror.address))
        ref = f"{primary.address}/{info.repository}:latest"
        assert pull(d, ref) == info.config_digest
        assert primary.count() == 0
        assert mirror.count(path=f"/v2/{info.repository}/manifests/latest") == 1
        for digest in info.blobs:
            assert mirror.blob_fetches(digest) == 1, digest
        image = status(d, ref).image
        assert list(image.repo_tags) == [ref]  # recorded under the name asked for
        assert list(image.repo_digests) == [
            f"{primary.address}/{info.repository}@{info.manifest_digest}"]


def test_mirrors_are_tried_in_order_then_the_primary(image_crib: ImageCrib,
                                                     test_registry: SeededRegistry) -> None:
    info = test_registry.images["layered"]
    dead = f"127.0.0.1:{free_port()}"
    with AuthProxy(test_registry.address) as primary, AuthProxy(test_registry.address) as mirror:
        mirror.fail_first(100, status=404, path_prefix=f"/v2/{info.repository}/manifests/")
        mirror_address = mirror.address
        d = image_crib(registries_conf=mirror_conf(primary.address, primary.address, dead,
                                                   mirror_address), pull_retries=0)
        ref = f"{primary.address}/{info.repository}:latest"
        assert pull(d, ref) == info.config_digest
        assert mirror.count(path=f"/v2/{info.repository}/manifests/latest", status=404) == 1
        assert served(primary) > 0
    log = d.log.read_text()
    assert dead in log and mirror_address in log


def test_short_names_use_the_search_list_and_aliases(image_crib: ImageCrib,
                                                     test_registry: SeededRegistry) -> None:
    reg = test_registry.address
    dead = f"127.0.0.1:{free_port()}"
    d = image_crib(registries_conf=f'unqualified-search-registries = ["{dead}", "{reg}"]\n'
                                   f'[aliases]\n"box" = "{reg}/crib-test/busybox"\n',
                   insecure=[reg, dead], pull_retries=0)
    info = test_registry.images["users-name"]
    assert pull(d, "crib-test/users-name") == info.config_digest
    assert list(status(d, info.config_digest).image.repo_tags) == [
        f"{reg}/crib-test/users-name:latest"]
    busybox = test_registry.images["busybox"]
    assert pull(d, "box:stable") == busybox.config_digest
    assert list(status(d, "box:stable").image.repo_tags) == [f"{reg}/crib-test/busybox:stable"]


# -- insecure, blocked ---------------------------------------------------------------------


def test_insecure_only_when_configured(image_crib: ImageCrib,
                                       test_registry: SeededRegistry) -> None:
    reg = test_registry.address
    d = image_crib(name="strict", insecure=[], pull_retries=0)
    err = pull_error(d, test_registry.ref("busybox"))
    assert str(err.details()).startswith("RegistryUnavailable"), err.details()
    assert reg in str(err.details())
    # insecure through registries.conf instead of crib.toml
    d2 = image_crib(name="conf", insecure=[],
                    registries_conf=f'[[registry]]\nlocation = "{reg}"\ninsecure = true\n')
    assert pull(d2, test_registry.ref("busybox")) == test_registry.images["busybox"].config_digest


def test_blocked_registry_is_refused(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    reg = test_registry.address
    prefix = f"{reg}/crib-test/busybox"
    d = image_crib(registries_conf=mirror_conf(prefix, prefix, blocked=True))
    err = pull_error(d, test_registry.ref("busybox"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "blocked" in str(err.details()) and prefix in str(err.details())
    assert pull(d, test_registry.ref("config")) == test_registry.images["config"].config_digest


# -- credentials ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [AuthMode.BASIC, AuthMode.BEARER])
def test_auth(image_crib: ImageCrib, test_registry: SeededRegistry, mode: AuthMode) -> None:
    info = test_registry.images["busybox"]
    with AuthProxy(test_registry.address, mode, users=USERS) as proxy:
        d = image_crib(insecure=[proxy.address])
        ref = f"{proxy.address}/{info.repository}:latest"
        for wrong in ({}, {"username": "alice", "password": "nope"},
                      {"username": "mallory", "password": "wonderland"}):
            err = pull_error(d, ref, **wrong)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (wrong, err.details())
            assert "unauthorized" in str(err.details()), err.details()
            assert proxy.address in str(err.details())
        assert status(d, ref).image.id == ""
        assert pull(d, ref, username="alice", password="wonderland") == info.config_digest
        remove_all(d)
        token = base64.b64encode(b"alice:wonderland").decode()
        assert pull(d, ref, auth=token) == info.config_digest
        if mode is AuthMode.BEARER:
            remove_all(d)
            granted = proxy.issue_token([f"repository:{info.repository}:pull"], "alice")
            assert pull(d, ref, registry_token=granted) == info.config_digest


def test_credentials_from_the_auth_file(image_crib: ImageCrib, test_registry: SeededRegistry,
                                        tmp_path: Path) -> None:
    info = test_registry.images["busybox"]
    with AuthProxy(test_registry.address, AuthMode.BEARER, users=USERS) as proxy:
        auth_file = tmp_path / "auth.json"
        token = base64.b64encode(b"alice:wonderland").decode()
        auth_file.write_text(json.dumps({"auths": {proxy.address: {"auth": token}}}))
        d = image_crib(insecure=[proxy.address], auth_file=str(auth_file))
        ref = f"{proxy.address}/{info.repository}:latest"
        assert pull(d, ref) == info.config_digest
        # the request's own credentials win over the file's
        remove_all(d)
        err = pull_error(d, ref, username="alice", password="wrong")
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def remove_all(d: Daemon) -> None:
    from api import api_pb2

    for image in d.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images:
        d.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image.id)),
                             timeout=10)


# -- SIGHUP --------------------------------------------------------------------------------


def wait_for_log(d: Daemon, text: str, count: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while d.log.read_text().count(text) < count:
        assert time.monotonic() < end, f"{text!r} not logged:\n{d.log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_sighup_rereads_the_mirror_list(image_crib: ImageCrib,
                                        test_registry: SeededRegistry) -> None:
    info = test_registry.images["config"]
    dead = f"127.0.0.1:{free_port()}"
    with AuthProxy(test_registry.address) as first, AuthProxy(test_registry.address) as second:
        d = image_crib(registries_conf=mirror_conf(dead, dead), pull_retries=0)
        ref = f"{dead}/{info.repository}:latest"
        err = pull_error(d, ref)
        assert str(err.details()).startswith("RegistryUnavailable"), err.details()
        conf = d.base / "registries.conf"
        conf.write_text(mirror_conf(dead, dead, first.address))
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for_log(d, "reloaded registries configuration", 1)
        assert pull(d, ref) == info.config_digest
        assert served(first) > 0
        # a second change: the next pull goes through the new mirror only
        remove_all(d)
        first.reset_records()
        second_address = second.address
        conf.write_text(mirror_conf(dead, dead, second_address))
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_for_log(d, "reloaded registries configuration", 2)
        assert pull(d, ref) == info.config_digest
        assert first.count() == 0
        assert served(second) > 0
    assert f"mirrors {second_address}" in d.log.read_text()
