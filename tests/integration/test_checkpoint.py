"""Checkpointing real runc containers on an overlay rootfs.

Where `criu check` fails on this host the checkpoint itself cannot be run: that
test skips and says why (criu's own words), while the refusal
(FAILED_PRECONDITION) and a dump that fails inside CRIU are still exercised
against the real runc, freezer and overlay.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cri.errors import CribError, FailedPrecondition, Internal
from runtimeservice import rootfs
from runtimeservice.checkpoint import CRIU_PATH, checkpoint, criu_available
from runtimeservice.checkpoint_archive import (
    ContainerInfo,
    inspect_archive,
    scan_upper,
    write_rootfs_diff,
)
from runtimeservice.oci import OciStatus
from runtimeservice.rootfs import RootfsPaths
from tests.integration.ocihelpers import Harness, harness, run, wait_for

__all__ = ["harness"]  # the shared fixture

pytestmark = pytest.mark.integration

SCRIPT = "echo state > /tmp/new; rm /bin/yes; sleep 1000"


def host_criu() -> tuple[bool, str]:
    ok, reason = run(criu_available(CRIU_PATH))
    print(f"criu check on this host: {'passes' if ok else 'fails'}: {reason}")
    return ok, reason


def mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        points = [line.split(" ", 5)[4] for line in fh]
    return [p for p in points if p.startswith(str(base) + "/")]


OverlayFactory = Callable[[list[str]], tuple[str, str, RootfsPaths]]


@pytest.fixture
def overlay(harness: Harness) -> Iterator[OverlayFactory]:
    """Start containers whose rootfs is an overlay over the busybox bundle rootfs."""
    made: list[tuple[str, RootfsPaths]] = []

    def start(args: list[str]) -> tuple[str, str, RootfsPaths]:
        cid = harness.new_id()
        bundle = harness.bundle(cid, args)
        paths = RootfsPaths(harness.base / "ctr" / cid)
        made.append((cid, paths))
        run(rootfs.mount([Path(bundle, "rootfs")], paths))
        config = Path(bundle, "config.json")
        spec = json.loads(config.read_text())
        spec["root"] = {"path": str(paths.merged), "readonly": False}
        config.write_text(json.dumps(spec))

        async def create() -> None:
            await harness.runtime.create(cid, bundle, str(harness.base / f"{cid}.pid"))
            await harness.runtime.start(cid)

        run(create())
        wait_for(lambda: (paths.upper / "tmp" / "new").exists(), "the container's first write")
        return cid, bundle, paths

    yield start

    async def teardown() -> None:
        for cid, paths in made:
            await harness.runtime.delete(cid, force=True)
            await rootfs.remove(paths)

    run(teardown())
    assert not mounts_under(harness.base), "overlay mounts left behind"


def status(harness: Harness, cid: str) -> OciStatus:
    state = run(harness.runtime.state(cid))
    assert isinstance(state.status, OciStatus)
    return state.status


def freezer_state(harness: Harness, cid: str) -> str:
    path = Path("/sys/fs/cgroup/freezer", harness.cgroup_parent.strip("/"), cid, "freezer.state")
    return path.read_text().strip() if path.exists() else "THAWED"


def test_criu_check_reports_its_reason() -> None:
    ok, reason = host_criu()
    assert reason
    if not ok:
        assert "check failed" in reason or "not installed" in reason
    assert run(criu_available(CRIU_PATH)) == (ok, reason)


def test_checkpoint_refused_when_criu_is_unusable(
    harness: Harness, overlay: OverlayFactory, tmp_path: Path
) -> None:
    ok, _ = host_criu()
    criu = str(tmp_path / "no-criu") if ok else CRIU_PATH  # a criu that fails either way
    expected = run(criu_available(criu))[1]
    cid, bundle, paths = overlay(["sh", "-c", SCRIPT])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FailedPrecondition) as info:
        run(checkpoint(harness.runtime, cid, bundle, paths.upper, out / "c.tar",
                       work_dir=tmp_path / "work", criu_path=criu))
    assert info.value.message == (
        f"cannot checkpoint container {cid}: CRIU is not usable on this host: {expected}")
    assert status(harness, cid) is OciStatus.RUNNING
    assert os.listdir(out) == [] and not (tmp_path / "work").exists()


def test_failed_dump_thaws_the_container_and_leaves_nothing(
    harness: Harness, overlay: OverlayFactory, tmp_path: Path
) -> None:
    ok, _ = host_criu()
    if ok:
        pytest.skip("criu works here: the dump succeeds (see test_checkpoint_running_container)")
    # Passes `criu check`, so the real runc and the real criu attempt the dump.
    wrapper = tmp_path / "criu-wrapper"
    wrapper.write_text('#!/bin/sh\n[ "$1" = check ] && { echo "Looks good."; exit 0; }\n'
                       f'exec {CRIU_PATH} "$@"\n')
    wrapper.chmod(0o755)
    cid, bundle, paths = overlay(["sh", "-c", SCRIPT])
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    with pytest.raises(CribError) as info:
        run(checkpoint(harness.runtime, cid, bundle, paths.upper, out / "c.tar",
                       work_dir=work, criu_path=str(wrapper)))
    print(f"dump failure reported as: {info.value.message}")
    assert type(info.value) is Internal
    assert info.value.message.startswith(f"runc checkpoint {cid} failed: criu failed")
    assert "(criu: " in info.value.message and "log file" not in info.value.message
    assert status(harness, cid) is OciStatus.RUNNING
    assert freezer_state(harness, cid) == "THAWED"
    assert os.listdir(out) == [] and os.listdir(work) == []
    assert run(harness.runtime.kill(cid, "KILL")) is True  # its process was still there


def test_checkpoint_running_container(
    harness: Harness, overlay: OverlayFactory, tmp_path: Path
) -> None:
    ok, reason = host_criu()
    if not ok:
        pytest.skip(f"criu check fails on this host, so nothing can be checkpointed: {reason}")
    cid, bundle, paths = overlay(["sh", "-c", SCRIPT])
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    info = ContainerInfo(cid, "k8s_app_pod_default_uid_0", runtime="runc",
                         created_at=1_700_000_000_000_000_000)
    result = run(checkpoint(harness.runtime, cid, bundle, paths.upper, out / "c.tar",
                            work_dir=work, info=info))
    assert result.archive == out / "c.tar" and result.left_running
    assert stat.S_IMODE(result.archive.stat().st_mode) == 0o600
    got = inspect_archive(result.archive)
    assert {"checkpoint", "config.dump", "spec.dump", "rootfs-diff.tar",
            "deleted.files"} <= got.members
    assert any(n.startswith("pages-") for n in got.image_files)
    assert got.config["id"] == cid and got.config["name"] == info.name
    assert got.spec["root"]["path"] == str(paths.merged)
    assert "tmp/new" in got.rootfs_diff and "/bin/yes" in got.deleted_files
    assert status(harness, cid) is OciStatus.RUNNING
    assert os.listdir(out) == ["c.tar"] and os.listdir(work) == []


def test_scan_upper_on_a_real_overlay(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    (lower / "a").mkdir(parents=True)
    for name in ("a/x", "a/y", "keep", "gone"):
        (lower / name).write_text(name)
    (lower / "same").write_text("untouched")
    paths = RootfsPaths(tmp_path / "ctr")

    async def main() -> None:
        await rootfs.mount([lower], paths)
        try:
            m = paths.merged
            (m / "new").write_text("new")
            (m / "keep").write_text("changed")
            (m / "gone").unlink()
            for name in ("x", "y"):
                (m / "a" / name).unlink()
            (m / "a").rmdir()
            (m / "a").mkdir()  # over a whiteout: an opaque directory
            (m / "a" / "fresh").write_text("fresh")
            (m / "proc").mkdir()
            changes = scan_upper(paths.upper, [lower], skip={"/proc"})
            assert changes.include == ("a", "a/fresh", "keep", "new")
            assert changes.deleted == ("/a/x", "/a/y", "/gone")
            write_rootfs_diff(paths.upper, changes.include, tmp_path / "diff.tar")
        finally:
            await rootfs.remove(paths)

    asyncio.run(main())
    with tarfile.open(tmp_path / "diff.tar") as tf:
        f = tf.extractfile("keep")
        assert f is not None and f.read() == b"changed"
        assert tf.getmember("a").isdir()
    assert not mounts_under(tmp_path)
