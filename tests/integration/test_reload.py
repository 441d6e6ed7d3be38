"""SIGHUP on a real daemon: crib.toml is re-read and what can change live is applied.

The mirror-list case through registries.conf alone (no crib.toml change) is
tests/integration/test_images_registries.py::test_sighup_rereads_the_mirror_list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from api import api_pb2
from tests.integration.authproxy import AuthProxy
from tests.integration.conftest import ImageCrib, SeededRegistry
from tests.integration.daemon import Daemon, new_daemon
from tests.integration.registry import free_port
from tests.integration.test_images_pull import list_images, pull, status
from tests.integration.test_images_registries import mirror_conf, served, wait_for_log

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("integration tests run as root")


def sighup(d: Daemon) -> None:
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGHUP)


def reload_and_wait(d: Daemon, done_before: int) -> None:
    """SIGHUP and wait for the reload to finish (the daemon logs at DEBUG here)."""
    sighup(d)
    wait_for_log(d, "reload: done", done_before + 1)


def running_config(d: Daemon) -> dict[str, object]:
    resp = d.runtime.Status(api_pb2.StatusRequest(verbose=True), timeout=10)
    config: dict[str, object] = json.loads(resp.info["config"])
    return config


@dataclasses.dataclass
class FileLevelDaemon(Daemon):
    """A daemon started without --log-level, so crib.toml's log_level is the one in force."""

    def argv(self) -> list[str]:
        args = super().argv()
        at = args.index("--log-level")
        del args[at:at + 2]
        return args


def test_log_level_changes_live(tmp_path: Path, crib_factory: list[Daemon]) -> None:
    plain = new_daemon(tmp_path / "crib")
    d = FileLevelDaemon(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)})
    conf = d.base / "registries.conf"
    conf.write_text("")
    image_table = (f"[image]\nregistries_conf = '{conf}'\n"
                   f"registries_conf_dir = '{d.base / 'registries.conf.d'}'\n")
    d.config.write_text("log_level = 'info'\n" + image_table)
    crib_factory.append(d)
    d.start()
    list_images(d)
    assert " DEBUG " not in d.log.read_text()

    d.config.write_text("log_level = 'debug'\n" + image_table)
    sighup(d)
    wait_for_log(d, "reload: log_level: 'info' -> 'debug'", 1)
    wait_for_log(d, "reload: done, 1 change(s) applied, 0 need a restart", 1)
    list_images(d)
    wait_for_log(d, "DEBUG [", 1)  # the ListImages request line, now logged
    assert running_config(d)["log_level"] == "debug"

    d.config.write_text("log_level = 'warning'\n" + image_table)
    sighup(d)
    wait_for_log(d, "reload: log_level: 'debug' -> 'warning'", 1)
    logged = d.log.read_text().count("\n")
    list_images(d)
    d.runtime.Version(api_pb2.VersionRequest(), timeout=10)
    assert d.log.read_text().count("\n") == logged  # nothing below WARNING any more


def test_new_mirror_through_crib_toml_routes_the_next_pull(
        image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    info = test_registry.images["config"]
    dead = f"127.0.0.1:{free_port()}"
    with AuthProxy(test_registry.address) as mirror:
        d = image_crib(registries_conf=mirror_conf(dead, dead), pull_retries=0)
        ref = f"{dead}/{info.repository}:latest"
        with pytest.raises(Exception, match="RegistryUnavailable"):
            pull(d, ref)
        # a second registries.conf, named by crib.toml: the [image] key changes
        other = d.base / "mirrored.conf"
        other.write_text(mirror_conf(dead, dead, mirror.address))
        old_conf = str(d.base / "registries.conf")
        d.config.write_text(d.config.read_text().replace(old_conf, str(other)))
        reload_and_wait(d, 0)
        log = d.log.read_text()
        assert f"reload: image.registries_conf: '{old_conf}' -> '{other}'" in log
        assert pull(d, ref) == info.config_digest
        assert served(mirror) > 0
        assert running_config(d)["image"]["registries_conf"] == str(other)  # type: ignore[index]


def test_invalid_config_is_refused_and_the_daemon_keeps_serving(
        image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib(pull_retries=1)
    good = d.config.read_text()
    before = running_config(d)
    for bad, needle in (("[image\npull_retries = 2\n", "invalid TOML"),
                        (good + "no_such_key = 1\n", "no_such_key: unknown key"),
                        (good.replace("pull_retries = 1", "pull_retries = -1"),
                         "image.pull_retries: -1 is below the minimum 0")):
        d.config.write_text(bad)
        sighup(d)
        wait_for_log(d, needle, 1)
        assert "reload: configuration error, keeping the running configuration" in \
            d.log.read_text()
        assert d.runtime.Version(api_pb2.VersionRequest(), timeout=10).runtime_name == "crib"
        assert running_config(d) == before
    # the daemon still pulls, and a good file applies again
    info = test_registry.images["busybox"]
    assert pull(d, test_registry.ref("busybox")) == info.config_digest
    d.config.write_text(good.replace("pull_retries = 1", "pull_retries = 2"))
    reload_and_wait(d, 0)
    assert "reload: image.pull_retries: 1 -> 2" in d.log.read_text()
    assert "Traceback" not in d.log.read_text()


def test_restart_only_keys_are_warned_about_and_not_applied(image_crib: ImageCrib) -> None:
    d = image_crib()
    d.config.write_text(d.config.read_text() + "[api]\nshutdown_grace = 3.0\n"
                                               "[runtime]\npids_limit = 100\n")
    reload_and_wait(d, 0)
    warnings = [line for line in d.log.read_text().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, warnings
    assert "needs a restart" in warnings[0]
    assert "api.shutdown_grace: 10.0 -> 3.0" in warnings[0]
    assert "runtime.pids_limit: 0 -> 100" in warnings[0]
    config = running_config(d)
    assert config["api"]["shutdown_grace"] == 10.0  # type: ignore[index]
    assert config["runtime"]["pids_limit"] == 0  # type: ignore[index]


def test_pinned_images_change_live(image_crib: ImageCrib, test_registry: SeededRegistry) -> None:
    d = image_crib()
    ref = test_registry.ref("busybox")
    pull(d, ref)
    assert not status(d, ref).image.pinned
    pattern = f"{test_registry.address}/crib-test/busybox*"
    d.config.write_text(d.config.read_text() + f"pinned_images = ['{pattern}']\n")
    reload_and_wait(d, 0)
    assert f"reload: image.pinned_images: [] -> ['{pattern}']" in d.log.read_text()
    assert status(d, ref).image.pinned
    assert [i.pinned for i in list_images(d)] == [True]
