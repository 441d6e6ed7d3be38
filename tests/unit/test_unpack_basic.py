"""unpack_layer: formats, metadata, replacement rules, diff ids (no root needed).

Also home of the small in-memory layer builders the other unpack tests import.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from cri.errors import FailedPrecondition, InvalidArgument
from imageservice.unpack import LayerError, UnpackResult, unpack_layer, unpack_layer_async

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
MTIME = 1_600_000_000


# -- builders (imported by the other unpack tests) ------------------------------


@dataclass
class E:
    """One tar entry."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: float = MTIME
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)  # raw extra PAX records


def f(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> E:
    return E(name, tarfile.REGTYPE, data, mode, **kw)  # type: ignore[arg-type]


def d(name: str, mode: int = 0o755, **kw: object) -> E:
    return E(name, tarfile.DIRTYPE, mode=mode, **kw)  # type: ignore[arg-type]


def sym(name: str, target: str, **kw: object) -> E:
    return E(name, tarfile.SYMTYPE, mode=0o777, link=target, **kw)  # type: ignore[arg-type]


def hard(name: str, target: str) -> E:
    return E(name, tarfile.LNKTYPE, link=target)


def wh(path: str) -> E:
    """The OCI whiteout for `path`."""
    parent, _, base = path.rpartition("/")
    return f(f"{parent}/.wh.{base}" if parent else f".wh.{base}")


def opaque(dirpath: str) -> E:
    return f(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq")


def tar_bytes(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.kind
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime
            ti.linkname = e.link
            ti.devmajor, ti.devminor = e.major, e.minor
            ti.pax_headers = {
                **{
                    f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                    for k, v in e.xattrs.items()
                },
                **e.pax,
            }
            if e.kind == tarfile.REGTYPE:
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_blob(directory: Path, raw: bytes, compression: str = "gzip") -> tuple[Path, str, str]:
    """Write a layer blob; returns (path, media type, diff id)."""
    if compression == "gzip":
        blob, media = gzip.compress(raw, compresslevel=1), GZ
    elif compression == "zstd":
        blob, media = zstandard.ZstdCompressor().compress(raw), ZST
    else:
        blob, media = raw, TAR
    path = directory / f"blob-{digest(blob)[7:19]}"
    path.write_bytes(blob)
    return path, media, digest(raw)


def layer(tmp: Path, entries: list[E], compression: str = "gzip") -> tuple[Path, str, str]:
    return write_blob(tmp, tar_bytes(entries), compression)


def unpack(tmp: Path, entries: list[E], dest: str = "out", **kw: str) -> Path:
    blob, media, diff_id = layer(tmp, entries, **kw)
    unpack_layer(blob, media, tmp / dest, diff_id)
    return tmp / dest


def tree(root: Path) -> dict[str, str]:
    """A comparable listing: path -> 'type mode [target|content]'."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            mode = oct(stat.S_IMODE(st.st_mode))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"l {os.readlink(p)}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = f"d {mode}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = f"f {mode} {p.read_bytes().decode(errors='replace')}"
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = f"c {os.major(st.st_rdev)}/{os.minor(st.st_rdev)}"
            else:
                out[rel] = f"? {st.st_mode:o}"
    return out


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- tests ------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_basic_tree_all_compressions(tmp_path: Path, compression: str) -> None:
    fds = open_fds()
    out = unpack(
        tmp_path,
        [
            d("./"),
            d("etc"),
            f("etc/hostname", b"box\n"),
            d("bin", 0o750),
            f("bin/tool", b"#!/bin/sh\n", 0o755),
            sym("bin/sh", "/bin/busybox"),
            f("empty"),
        ],
        compression=compression,
    )
    assert tree(out) == {
        "etc": "d 0o755",
        "etc/hostname": "f 0o644 box\n",
        "bin": "d 0o750",
        "bin/tool": "f 0o755 #!/bin/sh\n",
        "bin/sh": "l /bin/busybox",
        "empty": "f 0o644 ",
    }
    assert open_fds() == fds


def test_magic_bytes_win_over_media_type(tmp_path: Path) -> None:
    raw = tar_bytes([f("a", b"x")])
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(raw))
    unpack_layer(blob, TAR, tmp_path / "o1", digest(raw))  # labelled plain, really gzip
    blob.write_bytes(raw)
    unpack_layer(blob, GZ, tmp_path / "o2", digest(raw))  # labelled gzip, really plain
    assert (tmp_path / "o1/a").read_bytes() == (tmp_path / "o2/a").read_bytes() == b"x"


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path: Path) -> None:
    raw = tar_bytes([f("a", os.urandom(300_000)), f("b", b"tail")])
    cut = 70_001
    (tmp_path / "gz").write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    zc = zstandard.ZstdCompressor()
    (tmp_path / "zst").write_bytes(zc.compress(raw[:cut]) + zc.compress(raw[cut:]))
    unpack_layer(tmp_path / "gz", GZ, tmp_path / "o1", digest(raw))
    unpack_layer(tmp_path / "zst", ZST, tmp_path / "o2", digest(raw))
    for o in ("o1", "o2"):
        assert (tmp_path / o / "b").read_bytes() == b"tail"


def test_large_file_spanning_many_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 12345)
    out = unpack(tmp_path, [f("big", data), f("after", b"ok")], compression="zstd")
    assert (out / "big").read_bytes() == data
    assert (out / "after").read_bytes() == b"ok"


def test_modes_times_and_special_bits(tmp_path: Path) -> None:
    out = unpack(
        tmp_path,
        [
            d("tmp", 0o1777, mtime=1_500_000_000),
            f("tmp/x", b"1", 0o600),  # written after tmp/: its mtime must survive
            f("suid", b"s", 0o4755, mtime=1_400_000_000.25),
            d("ro", 0o555),
            f("ro/inner", b"i", 0o444),
            sym("link", "suid", mtime=1_300_000_000),
        ],
    )
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    assert (out / "tmp").stat().st_mtime == 1_500_000_000
    st = (out / "suid").stat()
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert st.st_mtime_ns == 1_400_000_000_250_000_000
    assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o555
    assert (out / "link").lstat().st_mtime == 1_300_000_000
    assert (out / "tmp/x").stat().st_mtime == MTIME


def test_hard_links_share_an_inode_and_count_once(tmp_path: Path) -> None:
    data = b"0123456789"
    blob, media, diff_id = layer(
        tmp_path, [d("a"), f("a/file", data), hard("a/link", "a/file"), hard("top", "./a/file")]
    )
    res = unpack_layer(blob, media, tmp_path / "out", diff_id)
    out = tmp_path / "out"
    assert (out / "a/file").stat().st_ino == (out / "a/link").stat().st_ino
    assert (out / "top").stat().st_nlink == 3
    assert res == UnpackResult(size=len(data), inodes=3)  # root, a, the file


def test_fifo_and_long_names_and_user_xattrs(tmp_path: Path) -> None:
    long = "d" * 120 + "/" + "n" * 150
    entries = [E("pipe", tarfile.FIFOTYPE, mode=0o640), f(long, b"long")]
    out = unpack(tmp_path, entries)
    assert stat.S_ISFIFO((out / "pipe").lstat().st_mode)
    assert (out / long).read_bytes() == b"long"
    xattr_value = b"\xff\x00bin"
    out2 = unpack(tmp_path, [f("x", b"", xattrs={"user.test": xattr_value})], dest="o2")
    try:
        assert os.getxattr(out2 / "x", "user.test") == xattr_value
    except OSError as exc:  # a filesystem without user xattrs: unpack skipped it
        pytest.skip(f"no user xattrs here: {exc}")


def test_implicit_parents_and_root_entry(tmp_path: Path) -> None:
    out = unpack(tmp_path, [d(".", 0o700, mtime=1_234_567_890), f("x/y/z", b"z")])
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert out.stat().st_mtime == 1_234_567_890
    assert stat.S_IMODE((out / "x").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "x/y").stat().st_mode) == 0o755


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    out = unpack(
        tmp_path,
        [
            f("a", b"first"),
            f("a", b"second", 0o600),  # file over file
            d("b"),
            f("b/child", b"c"),
            f("b", b"now a file"),  # file over a directory tree
            f("c", b"was file"),
            d("c", 0o700),  # directory over file
            d("e", 0o755),
            f("e/keep", b"k"),
            d("e", 0o711),  # directory over directory: merged, attributes replaced
            sym("s", "somewhere"),
            f("s", b"regular"),  # file over symlink: replaced, not followed
        ],
    )
    assert tree(out) == {
        "a": "f 0o600 second",
        "b": "f 0o644 now a file",
        "c": "d 0o700",
        "e": "d 0o711",
        "e/keep": "f 0o644 k",
        "s": "f 0o644 regular",
    }


def test_replacing_a_hard_link_does_not_touch_its_target(tmp_path: Path) -> None:
    out = unpack(tmp_path, [f("orig", b"original"), hard("hl", "orig"), f("hl", b"new")])
    assert (out / "orig").read_bytes() == b"original"
    assert (out / "hl").read_bytes() == b"new"


def test_empty_layers(tmp_path: Path) -> None:
    raw = tar_bytes([])
    blob, media, diff_id = write_blob(tmp_path, raw)
    assert unpack_layer(blob, media, tmp_path / "o1", diff_id) == UnpackResult(0, 1)
    (tmp_path / "zero").write_bytes(b"")
    assert unpack_layer(tmp_path / "zero", TAR, tmp_path / "o2", digest(b"")) == UnpackResult(0, 1)


def test_diff_id_covers_the_whole_stream(tmp_path: Path) -> None:
    raw = tar_bytes([f("a", b"x")]) + b"\0" * 8192  # extra end-of-archive padding
    blob, media, diff_id = write_blob(tmp_path, raw)
    unpack_layer(blob, media, tmp_path / "ok", diff_id)
    with pytest.raises(LayerError, match="expected diff id"):
        unpack_layer(blob, media, tmp_path / "bad", digest(raw[:-512]))
    assert not (tmp_path / "bad").exists()


def test_diff_id_mismatch_removes_destination(tmp_path: Path) -> None:
    blob, media, _ = layer(tmp_path, [f("a", b"x"), d("dir", 0o500), f("dir/f", b"", 0o400)])
    with pytest.raises(LayerError, match="diff id"):
        unpack_layer(blob, media, tmp_path / "out", digest(b"something else"))
    assert not (tmp_path / "out").exists()


def _bad_crc(gz: bytes) -> bytes:
    """Flip the stored CRC32 in the gzip trailer."""
    return gz[:-8] + bytes([gz[-8] ^ 0xFF]) + gz[-7:]


@pytest.mark.parametrize(
    "payload",
    [
        gzip.compress(b"not a tar at all, just some text" * 40),
        gzip.compress(tar_bytes([f("a", b"x" * 5000)]))[:-30],  # truncated gzip
        b"\x28\xb5\x2f\xfd" + b"garbage" * 20,  # zstd magic, broken frame
        tar_bytes([f("a", b"x" * 5000)])[:2048],  # truncated tar
        _bad_crc(gzip.compress(tar_bytes([f("a", b"x" * 5000)]))),
    ],
    ids=["gzip-of-text", "truncated-gzip", "broken-zstd", "truncated-tar", "gzip-bad-crc"],
)
def test_corrupt_blobs_are_refused(tmp_path: Path, payload: bytes) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(payload)
    with pytest.raises(LayerError):
        unpack_layer(blob, GZ, tmp_path / "out", digest(b"whatever"))
    assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path: Path) -> None:
    blob, media, diff_id = layer(tmp_path, [f("a")])
    with pytest.raises(InvalidArgument, match="media type"):
        unpack_layer(
            blob, "application/vnd.oci.image.layer.v1.tar+gzip+encrypted", tmp_path / "o", diff_id
        )
    with pytest.raises(InvalidArgument, match="algorithm"):
        unpack_layer(blob, media, tmp_path / "o", "sha512:" + "0" * 128)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FailedPrecondition):
        unpack_layer(blob, media, tmp_path / "exists", diff_id)
    assert (tmp_path / "exists").is_dir()  # not ours to remove
    assert not (tmp_path / "o").exists()


def test_unsupported_entry_type(tmp_path: Path) -> None:
    blob, media, diff_id = layer(tmp_path, [f("a"), E("vol", tarfile.GNUTYPE_SPARSE[:0] + b"V")])
    with pytest.raises(LayerError, match="unsupported type"):
        unpack_layer(blob, media, tmp_path / "out", diff_id)
    assert not (tmp_path / "out").exists()


def test_async_wrapper(tmp_path: Path) -> None:
    blob, media, diff_id = layer(tmp_path, [f("a", b"async")])
    res = asyncio.run(unpack_layer_async(blob, media, tmp_path / "out", diff_id))
    assert res.size == 5
    assert (tmp_path / "out/a").read_bytes() == b"async"
