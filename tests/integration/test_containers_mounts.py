"""CRI mounts of a container created by the ContainerManager: a symlinked host
path, read-only, and propagation host-to-container (rslave) and bidirectional
(rshared), observed from both sides."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import api_pb2
from runtimeservice.ocispec_mounts import DefaultMountFacts, default_mounts
from tests.integration.containerenv import (
    ContainerEnv,
    await_until,
    busybox_rootfs,
    cenv,
    run,
)

pytestmark = pytest.mark.integration
__all__ = ["busybox_rootfs", "cenv"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def shared_dir(cenv: ContainerEnv) -> Iterator[Path]:
    """A directory bind-mounted onto itself as a shared mount (unmounted afterwards)."""
    path = cenv.base / "shared"
    path.mkdir()
    sh("mount", "--bind", str(path), str(path))
    sh("mount", "--make-rshared", str(path))
    try:
        yield path
    finally:
        for m in sorted(cenv.mounts(), key=len, reverse=True):
            if m.startswith(str(path)):
                subprocess.run(["umount", "-l", m], capture_output=True)


def host_sys_bind_is_private() -> bool:
    """With host networking the host's /sys is bind-mounted; unless that bind says
    `rprivate`, a shared rootfs propagation (from a bidirectional mount) carries
    runc's own /sys/fs/cgroup tmpfs over the host's view and runc create fails."""
    mounts = default_mounts(DefaultMountFacts(host_network=True, host_ipc=True))
    sysfs = next(m for m in mounts if m["destination"] == "/sys")
    return sysfs["type"] != "bind" or "rprivate" in sysfs["options"]


def test_symlink_readonly_and_propagation_both_ways(cenv: ContainerEnv, shared_dir: Path) -> None:
    assert host_sys_bind_is_private()
    data = cenv.base / "data"
    data.mkdir()
    (data / "f").write_text("hi\n")
    link = cenv.base / "link"
    link.symlink_to(data)
    prop = api_pb2.MountPropagation

    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            config = cenv.config("m", ["sleep", "1000"])
            config.linux.security_context.capabilities.add_capabilities.append("SYS_ADMIN")
            config.mounts.add(container_path="/data", host_path=str(link), readonly=True)
            config.mounts.add(container_path="/down", host_path=str(shared_dir),
                              propagation=prop.PROPAGATION_HOST_TO_CONTAINER)
            config.mounts.add(container_path="/both", host_path=str(shared_dir),
                              propagation=prop.PROPAGATION_BIDIRECTIONAL)
            cid = await mgr.create(cenv.request(pod, config))
            await mgr.start_container(cid)

            async def inside(script: str) -> str:
                res = await mgr.exec_sync(cid, ["sh", "-c", script], 30)
                return (res.stdout + res.stderr).decode().strip()

            assert await inside("cat /data/f") == "hi"
            assert "Read-only file system" in await inside("touch /data/x")
            # host -> container
            (shared_dir / "h").mkdir()
            sh("mount", "-t", "tmpfs", "tmpfs", str(shared_dir / "h"))
            (shared_dir / "h" / "file").write_text("from host\n")
            assert await inside("cat /down/h/file") == "from host"
            # container -> host (only the bidirectional mount propagates back)
            assert await inside("mkdir -p /both/c && mount -t tmpfs none /both/c && "
                                "echo from container > /both/c/file") == ""
            await await_until(lambda: (shared_dir / "c" / "file").exists(), "propagation back")
            assert (shared_dir / "c" / "file").read_text() == "from container\n"
            st = (await mgr.status(cid)).status
            mounts = {m.container_path: m for m in st.mounts}
            assert mounts["/data"].host_path == str(data) and mounts["/data"].readonly
            assert mounts["/down"].propagation == prop.PROPAGATION_HOST_TO_CONTAINER
            assert mounts["/both"].propagation == prop.PROPAGATION_BIDIRECTIONAL
            await mgr.remove(cid)

    run(scenario())
