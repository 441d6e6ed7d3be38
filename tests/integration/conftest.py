"""Fixtures: a real crib daemon per test, checked for leftovers on teardown."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hack.testimages import BadDigest, ImageInfo, build_image, make_bad_digest, push_all
from tests.integration.daemon import (
    RUN_INDEX,
    Daemon,
    PodNet,
    assert_clean_exit,
    mounts_under,
    new_daemon,
    pod_daemon,
    release_private_roots,
    sandbox_leftovers,
)
from tests.integration.registry import REGISTRY_BIN, Registry, seed, start_registry


@pytest.fixture
def crib_factory(tmp_path: Path) -> Iterator[list[Daemon]]:
    """Daemons a test starts itself; each is stopped and checked at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            assert_clean_exit(d, d.stop())


@pytest.fixture
def crib(tmp_path: Path) -> Iterator[Daemon]:
    d = new_daemon(tmp_path / "crib")
    d.start()
    yield d
    code = d.stop()
    assert_clean_exit(d, code)


# -- images: a real registry seeded with the test images, daemons that use it ----------


@dataclass
class SeededRegistry:
    """The session's docker-registry on 127.0.0.1 with every non-big test image pushed."""

    registry: Registry
    images: dict[str, ImageInfo]

    @property
    def address(self) -> str:
        return self.registry.address

    def ref(self, name: str, tag: str | None = None) -> str:
        """``127.0.0.1:PORT/crib-test/NAME:TAG`` (the image's first tag by default)."""
        return self.images[name].reference(self.address, tag)

    def digest_ref(self, name: str) -> str:
        return self.images[name].digest_reference(self.address)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # strings and lists of strings are valid TOML this way


@pytest.fixture(scope="session")
def test_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededRegistry]:
    if os.geteuid() != 0:
        pytest.skip("integration tests run as root")
    if not Path(REGISTRY_BIN).exists():
        pytest.skip(f"{REGISTRY_BIN} is not installed")
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield SeededRegistry(reg, seed(reg))
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def big_image(test_registry: SeededRegistry) -> ImageInfo:
    """crib-test/big (~200 MB, 9 layers) pushed to the session registry."""
    info = build_image("big")
    push_all(test_registry.address, [info])
    test_registry.images["big"] = info
    return info


@pytest.fixture(scope="session")
def bad_digest_image(test_registry: SeededRegistry) -> BadDigest:
    """crib-test/bad-digest, whose layer the registry now serves with the wrong bytes."""
    reg = test_registry.registry
    bad = make_bad_digest(reg.address, reg.storage_root)
    test_registry.images["bad-digest"] = bad.info
    return bad


ImageCrib = Callable[..., Daemon]


@pytest.fixture
def image_crib(tmp_path: Path, crib_factory: list[Daemon],
               test_registry: SeededRegistry) -> ImageCrib:
    """Start a daemon whose [image] settings point at the test registry.

    ``start(name="crib", registries_conf="", insecure=None, root=None, **image_options)``:
    registries.conf gets ``registries_conf`` (a fresh file, so the host's is never
    read); ``insecure`` defaults to the test registry's address; other keyword
    arguments are [image] options (auth_file, pull_retries, ...).
    """

    def start(name: str = "crib", registries_conf: str = "", insecure: list[str] | None = None,
              root: Path | None = None, **options: object) -> Daemon:
        base = tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        conf = base / "registries.conf"
        conf.write_text(registries_conf)
        (base / "registries.conf.d").mkdir(exist_ok=True)
        settings: dict[str, object] = {
            "registries_conf": str(conf),
            "registries_conf_dir": str(base / "registries.conf.d"),
            "insecure_registries": [test_registry.address] if insecure is None else insecure,
            **options,
        }
        lines = ["[image]", *(f"{k} = {_toml_value(v)}" for k, v in settings.items())]
        (base / "crib.toml").write_text("\n".join(lines) + "\n")
        daemon = new_daemon(base)
        if root is not None:
            daemon.root = root
        crib_factory.append(daemon)
        daemon.start()
        return daemon

    return start


# -- pod sandboxes: a test CNI network, daemons that use it, a leftover check ----------


@pytest.fixture(scope="session")
def pod_host() -> Iterator[None]:
    """Put back what the CNI plugins change on the host: the test bridge, ip_forward, the
    portmap plugin's shared chains (only when these tests created them)."""
    import subprocess

    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    had_chains = "CNI-HOSTPORT-DNAT" in nat
    yield
    subprocess.run(["ip", "link", "del", PodNet.bridge], capture_output=True)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)
    nat = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    if not had_chains and "-A CNI-HOSTPORT-DNAT" not in nat:
        for rule in ("PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                     "OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
                     "POSTROUTING -m comment --comment 'CNI portfwd requiring masquerade' "
                     "-j CNI-HOSTPORT-MASQ"):
            subprocess.run(f"iptables -t nat -D {rule}", shell=True, capture_output=True)
        for chain in ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK"):
            subprocess.run(["iptables", "-t", "nat", "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", "nat", "-X", chain], capture_output=True)


POD_CGROUP_PARENT = f"/cribtest-sandboxes-{RUN_INDEX}"


@pytest.fixture
def pod_net(tmp_path: Path, pod_host: None) -> Iterator[PodNet]:
    """The test network; after the test: no sandbox resource left, the daemons' dirs clean.

    Tests start their daemons with ``pod_daemon(base, pod_net)`` and append them to
    ``crib_factory`` (stopped and checked first, as it is set up after this fixture).
    """
    from runtimeservice import cgroups

    net = PodNet(conf_dir=tmp_path / "net.d", plugin_dir=tmp_path / "plugins",
                 ipam=tmp_path / "ipam")
    net.write()
    yield net
    bases = [p.parent for p in tmp_path.glob("*/crib.toml")]
    problems = []
    for base in bases:
        d = new_daemon(base)
        problems += sandbox_leftovers(d, net, POD_CGROUP_PARENT)
        release_private_roots(d)
        problems += [f"mount {m}" for m in mounts_under(base)]
    layout = cgroups.detect()
    for h in layout.hierarchies():
        top = h / POD_CGROUP_PARENT.strip("/")
        if top.is_dir():
            try:
                top.rmdir()
            except OSError as exc:
                problems.append(f"cgroup {top}: {exc}")
    assert problems == []


PodCrib = Callable[..., Daemon]


@pytest.fixture
def pod_crib(tmp_path: Path, pod_net: PodNet, crib_factory: list[Daemon]) -> Iterator[PodCrib]:
    """``start(name="crib", extra_config="") -> Daemon`` on the test network.

    At teardown every sandbox still listed is stopped and removed through the API,
    then the daemons stop and `pod_net` checks that nothing is left.
    """
    from api import api_pb2

    def start(name: str = "crib", extra_config: str = "") -> Daemon:
        d = pod_daemon(tmp_path / name, pod_net, extra_config)
        crib_factory.append(d)
        d.start()
        return d

    yield start
    for d in crib_factory:
        if d.proc is None or d.proc.poll() is not None or d.channel is None:
            continue
        for pod in d.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest()).items:
            d.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id))
            d.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
