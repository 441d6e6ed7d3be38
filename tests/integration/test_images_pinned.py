"""image.pinned_images on a real daemon: ImageStatus, ListImages and StreamImages say pinned."""

from __future__ import annotations

import os

import pytest

from api import api_pb2
from tests.integration.conftest import ImageCrib, SeededRegistry
from tests.integration.daemon import Daemon
from tests.integration.test_images_pull import list_images, pull, remove, status

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests run as root")


def streamed(d: Daemon) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for resp in d.images.StreamImages(api_pb2.StreamImagesRequest(), timeout=10):
        out.update({image.id: image.pinned for image in resp.images})
    return out


def test_exact_glob_and_keyword_patterns(image_crib: ImageCrib,
                                         test_registry: SeededRegistry) -> None:
    reg = test_registry.address
    images = test_registry.images
    d = image_crib(pinned_images=[
        f"{reg}/crib-test/busybox*",  # glob: every tag and digest of busybox
        test_registry.ref("config"),  # exact
        "*crib-test/users-name@*",  # keyword: users-name pulled by digest
    ])
    for name in ("busybox", "config", "layered"):
        pull(d, test_registry.ref(name))
    pull(d, test_registry.digest_ref("users-name"))
    expected = {images["busybox"].config_digest: True, images["config"].config_digest: True,
                images["layered"].config_digest: False,
                images["users-name"].config_digest: True}
    assert {i.id: i.pinned for i in list_images(d)} == expected
    assert streamed(d) == expected
    assert status(d, test_registry.ref("busybox")).image.pinned
    busybox_id = images["busybox"].config_digest
    assert busybox_id is not None and status(d, busybox_id).image.pinned  # looked up by id
    assert status(d, test_registry.digest_ref("users-name")).image.pinned
    assert not status(d, test_registry.ref("layered")).image.pinned
    # pinning keeps the kubelet's GC away; an explicit RemoveImage still removes
    remove(d, test_registry.ref("config"))
    assert status(d, test_registry.ref("config")).image.id == ""


def test_pins_hold_across_a_restart(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib(pinned_images=[test_registry.ref("busybox")])
    pull(d, test_registry.ref("busybox"))
    assert status(d, test_registry.ref("busybox")).image.pinned
    d.stop()
    d.start()
    assert status(d, test_registry.ref("busybox")).image.pinned
