"""Pinned pod namespaces on the real kernel: create, configure, enter, unpin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.errors import AlreadyExists, InvalidArgument
from runtimeservice import namespaces, sysctls
from runtimeservice.namespaces import NamespaceKind

pytestmark = pytest.mark.integration


def mounts_under(root: Path, pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(root))]


@pytest.fixture
def ns_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "ns"
    yield root
    if root.exists():
        for d in root.iterdir():
            asyncio.run(namespaces.remove(d))
    namespaces.release_root(root)
    assert mounts_under(root) == []


def nsenter(kind: str, path: Path, *cmd: str) -> str:
    out = subprocess.run(["nsenter", f"--{kind}={path}", *cmd], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


def read_host(path: str) -> str:
    return Path(path).read_text().strip()


def test_create_pins_configures_and_removes(ns_root: Path) -> None:
    host = {p: read_host(p) for p in ("/proc/sys/net/ipv4/ip_unprivileged_port_start",
                                      "/proc/sys/kernel/shmmni",
                                      "/proc/sys/kernel/domainname")}
    host_name = os.uname().nodename
    sc = sysctls.validate({"net.ipv4.ip_unprivileged_port_start": "80",
                           "kernel.shmmni": "1234", "kernel.domainname": "pod.local"})
    pod = asyncio.run(namespaces.create(ns_root / "sb1", hostname="web-0", sysctls=sc))
    assert pod.kinds == (NamespaceKind.NET, NamespaceKind.IPC, NamespaceKind.UTS)
    paths = pod.paths()
    for kind, path in paths.items():
        assert namespaces.is_pinned(path)
        assert namespaces.namespace_id(path) != os.stat(f"/proc/self/ns/{kind.value}").st_ino
    assert nsenter("uts", paths[NamespaceKind.UTS], "hostname") == "web-0"
    assert nsenter("uts", paths[NamespaceKind.UTS], "cat", "/proc/sys/kernel/domainname") \
        == "pod.local"
    assert nsenter("net", paths[NamespaceKind.NET], "cat",
                   "/proc/sys/net/ipv4/ip_unprivileged_port_start") == "80"
    assert nsenter("ipc", paths[NamespaceKind.IPC], "cat", "/proc/sys/kernel/shmmni") == "1234"
    # The node is untouched.
    assert {p: read_host(p) for p in host} == host
    assert os.uname().nodename == host_name

    root_line = next(line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                     if line.split()[4] == str(ns_root))
    assert "shared:" not in root_line and "master:" not in root_line

    asyncio.run(namespaces.remove(pod.directory))
    assert not pod.directory.exists()
    assert not any(namespaces.is_pinned(p) for p in paths.values())
    assert mounts_under(ns_root) == [str(ns_root)]  # only the private root itself
    asyncio.run(namespaces.remove(pod.directory))  # idempotent


def test_network_only_pod_leaves_host_hostname_alone(ns_root: Path) -> None:
    name = os.uname().nodename
    pod = asyncio.run(namespaces.create(ns_root / "sb2", [NamespaceKind.NET], hostname="x"))
    assert sorted(p.name for p in pod.directory.iterdir()) == ["net"]
    assert pod.path(NamespaceKind.UTS) is None and pod.net is not None
    assert os.uname().nodename == name
    # Sysctls of namespaces the pod does not own are refused before anything happens.
    with pytest.raises(InvalidArgument, match=r"kernel\.shmmni"):
        asyncio.run(namespaces.create(ns_root / "sb3", [NamespaceKind.NET],
                                      sysctls=sysctls.validate({"kernel.shmmni": "1"})))
    assert not (ns_root / "sb3").exists()


def test_pinning_twice_is_already_exists(ns_root: Path) -> None:
    pod = asyncio.run(namespaces.create(ns_root / "sb"))
    before = namespaces.namespace_id(pod.directory / "net")
    with pytest.raises(AlreadyExists):
        asyncio.run(namespaces.create(ns_root / "sb"))
    assert namespaces.namespace_id(pod.directory / "net") == before


def test_failed_create_leaves_nothing_pinned(ns_root: Path) -> None:
    bad = sysctls.validate({"net.ipv4.conf.eth0.forwarding": "1"})  # no eth0 yet
    with pytest.raises(InvalidArgument, match="does not exist"):
        asyncio.run(namespaces.create(ns_root / "sb", sysctls=bad))
    assert not any(namespaces.is_pinned(p) for p in (ns_root / "sb").iterdir())
    assert mounts_under(ns_root) == [str(ns_root)]
    asyncio.run(namespaces.remove(ns_root / "sb"))
    assert not (ns_root / "sb").exists()


def test_enter_and_apply_sysctls_later(ns_root: Path) -> None:
    pod = asyncio.run(namespaces.create(ns_root / "sb"))
    assert pod.net is not None

    def interfaces() -> list[str]:
        lines = Path("/proc/thread-self/net/dev").read_text().splitlines()[2:]
        return [line.split(":")[0].strip() for line in lines]

    assert asyncio.run(namespaces.run_in_namespaces({NamespaceKind.NET: pod.net},
                                                    interfaces)) == ["lo"]
    asyncio.run(namespaces.apply_sysctls(pod, sysctls.validate({"net.core.somaxconn": "77"})))
    assert nsenter("net", pod.net, "cat", "/proc/sys/net/core/somaxconn") == "77"
    assert read_host("/proc/sys/net/core/somaxconn") != "77"


def test_concurrent_creates_get_distinct_namespaces(ns_root: Path) -> None:
    async def many() -> list[namespaces.PodNamespaces]:
        return await asyncio.gather(*(namespaces.create(ns_root / f"p{i}", hostname=f"h{i}")
                                      for i in range(10)))

    pods = asyncio.run(many())
    ids = {namespaces.namespace_id(p.directory / "net") for p in pods}
    assert len(ids) == 10
    assert nsenter("uts", pods[7].directory / "uts", "hostname") == "h7"


@pytest.mark.parametrize("propagation", ["unchanged", "slave"])
def test_unpin_reaches_mount_namespaces_cloned_later(ns_root: Path, propagation: str) -> None:
    """A mount namespace cloned after pinning must not keep the namespace alive."""
    pod = asyncio.run(namespaces.create(ns_root / "sb"))
    pin = str(pod.directory / "net")
    proc = subprocess.Popen(["unshare", "-m", f"--propagation={propagation}",
                             "sleep", "60"])
    try:
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/mnt") == own and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.readlink(f"/proc/{proc.pid}/ns/mnt") != own
        assert pin in mounts_under(ns_root, proc.pid)
        asyncio.run(namespaces.remove(pod.directory))
        assert pin not in mounts_under(ns_root, proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_pins_do_not_propagate_into_existing_mount_namespaces(ns_root: Path) -> None:
    namespaces.prepare_root(ns_root)
    proc = subprocess.Popen(["unshare", "-m", "--propagation=unchanged", "sleep", "60"])
    try:
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/mnt") == own and time.monotonic() < deadline:
            time.sleep(0.01)
        pod = asyncio.run(namespaces.create(ns_root / "sb"))
        assert str(pod.directory / "net") in mounts_under(ns_root)
        assert mounts_under(ns_root, proc.pid) == [str(ns_root)]
    finally:
        proc.kill()
        proc.wait()


def test_cancelled_create_leaves_nothing(ns_root: Path) -> None:
    namespaces.prepare_root(ns_root)

    async def cancel_midway(i: int) -> None:
        task = asyncio.create_task(namespaces.create(ns_root / f"c{i}"))
        await asyncio.sleep(0.0002 * i)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    for i in range(10):
        asyncio.run(cancel_midway(i))
        assert not (ns_root / f"c{i}").exists() or namespaces.is_pinned(ns_root / f"c{i}" / "net")
    assert all(namespaces.is_pinned(d / "net") for d in ns_root.iterdir())
