"""Layer unpacking as root: owners, devices, xattrs, whiteouts, and real overlay mounts.

The overlay tests mount the unpacked layers the way containers will (lowerdirs
top-most first, plus an upper and a work dir) and compare the merged view
with what the OCI layer rules say it must be.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from imageservice.layers import LayerStore, chain_ids
from imageservice.unpack import LayerError, unpack_layer
from tests.unit.test_unpack_basic import E, d, f, layer, opaque, sym, tar_bytes, wh, write_blob

pytestmark = pytest.mark.integration


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(path))]


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    yield
    assert _mounts_under(tmp_path) == []


@contextlib.contextmanager
def overlay(lowerdirs: Sequence[Path], where: Path) -> Iterator[Path]:
    """Mount lowerdirs (top-most first) with a scratch upper dir; unmount after."""
    for sub in ("upper", "work", "merged"):
        (where / sub).mkdir(parents=True)
    opts = (
        f"lowerdir={':'.join(map(str, lowerdirs))},"
        f"upperdir={where / 'upper'},workdir={where / 'work'}"
    )
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(where / "merged")], check=True
    )
    try:
        yield where / "merged"
    finally:
        subprocess.run(["umount", str(where / "merged")], check=True)


def describe(root: Path) -> dict[str, dict[str, Any]]:
    """The merged tree in the test-images format (see hack/testimages/tree.py)."""
    out: dict[str, dict[str, Any]] = {}
    inodes: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath) / name
            st = p.lstat()
            rec: dict[str, Any] = {"uid": st.st_uid, "gid": st.st_gid}
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                rec.update(type="symlink", target=os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                rec.update(type="dir", mode=mode)
            elif stat.S_ISREG(st.st_mode):
                data = p.read_bytes()
                rec.update(
                    type="file", mode=mode, size=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
                xattrs = {
                    k: os.getxattr(p, k).decode("utf-8", "surrogateescape")
                    for k in os.listxattr(p)
                    if k.startswith("user.")
                }
                if xattrs:
                    rec["xattrs"] = xattrs
                inodes["/" + str(p.relative_to(root))] = st.st_ino
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "char" if stat.S_ISCHR(st.st_mode) else "block"
                rec.update(
                    type=kind, mode=mode, major=os.major(st.st_rdev), minor=os.minor(st.st_rdev)
                )
            elif stat.S_ISFIFO(st.st_mode):
                rec.update(type="fifo", mode=mode)
            out["/" + str(p.relative_to(root))] = rec
    out["__inodes__"] = inodes
    return out


def compare(expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]) -> None:
    inodes = got.pop("__inodes__")
    for path, rec in expected.items():
        if "hardlink_to" in rec:
            assert inodes[path] == inodes[rec["hardlink_to"]], path
    want = {k: {x: y for x, y in v.items() if x != "hardlink_to"} for k, v in expected.items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert (missing, extra) == ([], [])
    assert {k: got[k] for k in want if got[k] != want[k]} == {
        k: want[k] for k in want if got[k] != want[k]
    }


# -- metadata that needs root ------------------------------------------------


def test_owners_devices_fifos_and_xattrs(tmp_path: Path) -> None:
    cap = b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    blob, media, diff_id = layer(
        tmp_path,
        [
            d("home", 0o755),
            d("home/app", 0o700, uid=1000, gid=1000),
            f("home/app/f", b"x", 0o640, uid=1000, gid=1001),
            f("suid", b"s", 0o4755, uid=1234, gid=5678),  # chown must not eat the setuid bit
            f("sgid", b"s", 0o2711, uid=0, gid=42),
            sym("home/link", "app/f", uid=1000, gid=1000),
            E("dev/null", tarfile.CHRTYPE, mode=0o666, major=1, minor=3),
            E("dev/loop9", tarfile.BLKTYPE, mode=0o660, major=7, minor=9, gid=6),
            E("run/fifo", tarfile.FIFOTYPE, mode=0o620, uid=7),
            f("bin/ping", b"elf", 0o755, xattrs={"security.capability": cap}),
            f("t", b"", xattrs={"trusted.crib": b"yes", "user.a": b"\x00\xff"}),
            f("o", b"", xattrs={"trusted.overlay.redirect": b"/etc"}),  # reserved: dropped
            d("hidden", 0o000),
            f("hidden/inside", b"in", 0o000),
        ],
    )
    out = tmp_path / "out"
    unpack_layer(blob, media, out, diff_id)

    def own(p: str) -> tuple[int, int, int]:
        st = (out / p).lstat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert own("home/app") == (1000, 1000, 0o700)
    assert own("home/app/f") == (1000, 1001, 0o640)
    assert own("suid") == (1234, 5678, 0o4755)
    assert own("sgid") == (0, 42, 0o2711)
    assert own("home/link")[:2] == (1000, 1000)
    assert own("run/fifo") == (7, 0, 0o620)
    assert own("hidden") == (0, 0, 0o000)
    assert (out / "hidden/inside").read_bytes() == b"in"
    st = (out / "dev/null").lstat()
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    st = (out / "dev/loop9").lstat()
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 9)
    assert stat.S_ISFIFO((out / "run/fifo").lstat().st_mode)
    assert os.getxattr(out / "bin/ping", "security.capability") == cap
    assert os.getxattr(out / "t", "trusted.crib") == b"yes"
    assert os.getxattr(out / "t", "user.a") == b"\x00\xff"
    assert "trusted.overlay.redirect" not in os.listxattr(out / "o")


def test_whiteouts_and_opaque_markers_in_the_diff_dir(tmp_path: Path) -> None:
    blob, media, diff_id = layer(
        tmp_path,
        [
            d("etc"),
            wh("etc/gone"),
            opaque("opt"),
            f("opt/new", b"n"),
            f(".wh..wh.plnk"),  # aufs bookkeeping: skipped
            d("var"),
            d("var/lib"),
            wh("var/lib"),  # whited out and present in the same layer: opaque
            f("re", b"kept"),
            wh("re"),  # a file of this layer stays: whiteouts only hide lower layers
            wh("x/y"),  # implicit parent
        ],
    )
    out = tmp_path / "out"
    unpack_layer(blob, media, out, diff_id)
    st = (out / "etc/gone").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(out / "opt", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(out / "var/lib", "trusted.overlay.opaque") == b"y"
    assert (out / "re").read_bytes() == b"kept"
    assert stat.S_ISCHR((out / "x/y").lstat().st_mode)
    assert sorted(os.listdir(out)) == ["etc", "opt", "re", "var", "x"]
    assert "trusted.overlay.opaque" not in os.listxattr(out / "etc")


# -- overlay: the merged view ---------------------------------------------------

BASE = [
    d("etc"),
    f("etc/a", b"a0"),
    f("etc/b", b"b0"),
    d("etc/sub"),
    f("etc/sub/x", b"x0"),
    d("opt"),
    f("opt/keep", b"k0"),
    d("opt/deep"),
    f("opt/deep/d1", b"d1"),
    d("var"),
    d("var/lib"),
    f("var/lib/f", b"f0"),
    d("usr"),
    d("usr/bin"),
    f("usr/bin/tool", b"t0", 0o755),
    d("swap"),
    f("swap/child", b"c0"),
]
MIDDLE_MARKERS_FIRST = [
    wh("etc/a"),
    wh("etc/sub"),
    opaque("opt"),
    f("opt/new", b"n1"),
    wh("var/lib"),
    d("var/lib"),
    f("var/lib/g", b"g1"),
    f("usr/bin/tool", b"t1", 0o755),
    wh("nothing"),
    f("swap", b"now a file"),
]
# The same changes with the markers after the entries they accompany (order must not matter).
MIDDLE_MARKERS_LAST = [
    f("opt/new", b"n1"),
    d("var/lib"),
    f("var/lib/g", b"g1"),
    f("usr/bin/tool", b"t1", 0o755),
    f("swap", b"now a file"),
    wh("etc/a"),
    wh("etc/sub"),
    opaque("opt"),
    wh("var/lib"),
    wh("nothing"),
]
TOP = [
    f("etc/a", b"a2"),
    wh("opt/new"),
    f("var/lib/h", b"h2"),
    d("swap"),
    f("swap/again", b"s2"),
]
MERGED = {
    "etc": "d",
    "etc/a": "a2",
    "etc/b": "b0",
    "opt": "d",
    "var": "d",
    "var/lib": "d",
    "var/lib/g": "g1",
    "var/lib/h": "h2",
    "usr": "d",
    "usr/bin": "d",
    "usr/bin/tool": "t1",
    "swap": "d",
    "swap/again": "s2",
}


def merged_view(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = "d"
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = p.read_bytes().decode()
    return out


@pytest.mark.parametrize(
    "middle", [MIDDLE_MARKERS_FIRST, MIDDLE_MARKERS_LAST], ids=["first", "last"]
)
def test_overlay_of_unpacked_layers_matches_the_oci_rules(tmp_path: Path, middle: list[E]) -> None:
    store = LayerStore(tmp_path / "images", sync=False)
    blobs = [layer(tmp_path, entries) for entries in (BASE, middle, TOP)]
    chains = chain_ids([diff for _, _, diff in blobs])
    parent = None
    for blob, media, diff in blobs:
        parent = store.add(parent, diff, blob, media).chain_id
    lowers = store.lowerdirs(chains)
    assert lowers[0] == store.diff_path(chains[-1])
    with overlay(lowers, tmp_path / "ctr") as merged:
        assert merged_view(merged) == MERGED
    for c in chains:
        assert store.remove(c)
    assert os.listdir(tmp_path / "images" / "layers") == []


# -- the project's test images ---------------------------------------------------


def _test_images() -> dict[str, Any]:
    try:
        from hack.testimages import build_all
        from hack.testimages.model import default_cache_dir
    except ImportError as exc:  # pragma: no cover - the images live in another module
        pytest.skip(f"hack.testimages unavailable: {exc}")
    if not (default_cache_dir() / "index.json").exists() and not os.environ.get(
        "CRIB_BUILD_TEST_IMAGES"
    ):
        pytest.skip("test images not built (python3 -m hack.testimages build)")
    return build_all()


def _platform_layers(info: Any) -> tuple[list[tuple[Path, str]], list[str]]:
    from hack.testimages import host_platform

    pm = info.platforms[host_platform()]
    manifest = json.loads(info.blob_path(pm.manifest_digest).read_bytes())
    config = json.loads(info.blob_path(pm.config_digest).read_bytes())
    blobs = [(info.blob_path(x["digest"]), x["mediaType"]) for x in manifest["layers"]]
    return blobs, config["rootfs"]["diff_ids"]


def test_test_images_unpack_to_their_expected_trees(tmp_path: Path) -> None:
    from hack.testimages import host_platform, load_tree

    images = _test_images()
    store = LayerStore(tmp_path / "images", sync=False)
    checked = []
    for name, info in sorted(images.items()):
        if info.tree_path is None or host_platform() not in info.platforms:
            continue
        blobs, diff_ids = _platform_layers(info)
        parent = None
        for (blob, media), diff in zip(blobs, diff_ids, strict=True):
            parent = store.add(parent, diff, blob, media).chain_id
        with overlay(store.lowerdirs(chain_ids(diff_ids)), tmp_path / "ctr" / name) as merged:
            compare(load_tree(info.tree_path), describe(merged))
        checked.append(name)
    assert "layered" in checked, checked


def test_evil_test_images_write_nothing_outside(tmp_path: Path) -> None:
    images = _test_images()
    tried = []
    for name in ("evil-dotdot", "evil-abs", "evil-symlink"):
        info = images.get(name)
        if info is None:
            continue
        dest = tmp_path / name
        watched = [Path(p) for k, p in info.notes.items() if k.startswith("host_path")]
        watched += [
            Path(os.path.normpath(dest / p))
            for k, p in info.notes.items()
            if k == "escape_relative_to_rootfs"
        ]
        assert watched, info.notes
        for p in watched:
            assert not p.exists(), f"{p} exists before the test"
        [(blob, media)], [diff] = _platform_layers(info)
        with contextlib.suppress(LayerError):
            unpack_layer(blob, media, dest, diff)
        for p in watched:
            assert not p.exists(), f"{name} wrote {p}"
        tried.append(name)
    assert tried


def test_a_big_layer_round_trips(tmp_path: Path) -> None:
    """Many files and one large one, gzip: sizes and contents survive."""
    entries = [f(f"many/{i:05}", os.urandom(i % 700)) for i in range(3000)]
    entries.append(f("large.bin", os.urandom(40 << 20)))
    blob, media, diff = write_blob(tmp_path, tar_bytes(entries), "gzip")
    res = unpack_layer(blob, media, tmp_path / "out", diff)
    assert res.size == sum(len(e.data) for e in entries)
    assert res.inodes == 1 + 1 + 3000 + 1
    assert (tmp_path / "out/large.bin").read_bytes() == entries[-1].data
