"""Overlay root filesystems, including chains of layers too long for one mount page."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from runtimeservice import rootfs
from runtimeservice.rootfs import PAGE_LIMIT, RootfsPaths, overlay_options

pytestmark = pytest.mark.integration


def make_layers(base: Path, count: int) -> list[Path]:
    layers = []
    for i in range(count):
        d = base / "layers" / f"{i:064x}" / "diff"
        d.mkdir(parents=True)
        (d / f"file{i}").write_text(str(i))
        (d / "shared").write_text(f"layer {i}")
        layers.append(d)
    return list(reversed(layers))  # top-most first


@pytest.mark.parametrize("count", [1, 3, 120, 400])
def test_mount_write_unmount(tmp_path: Path, count: int) -> None:
    lowers = make_layers(tmp_path, count)
    paths = RootfsPaths(tmp_path / "ctr")
    if count == 120:
        assert len(overlay_options(lowers, paths.upper, paths.work)) > PAGE_LIMIT

    async def main() -> None:
        await rootfs.mount(lowers, paths)
        try:
            assert rootfs.is_mounted(paths.merged)
            assert (paths.merged / "shared").read_text() == f"layer {count - 1}"
            assert (paths.merged / "file0").read_text() == "0"
            (paths.merged / "new").write_text("x" * 10000)
            assert (paths.upper / "new").exists()
            used, inodes = rootfs.usage(paths)
            assert used >= 10000 and inodes == 1
        finally:
            await rootfs.remove(paths)
        assert not rootfs.is_mounted(paths.merged)
        assert not paths.upper.exists() and not paths.merged.exists()
        await rootfs.remove(paths)  # idempotent

    asyncio.run(main())
    # the layers themselves are untouched
    assert (lowers[-1] / "shared").read_text() == "layer 0"
