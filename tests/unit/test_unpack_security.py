"""Evil layers: nothing may be created, changed or linked outside the destination."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imageservice.unpack import LayerError, unpack_layer
from tests.unit.test_unpack_basic import E, d, f, hard, layer, opaque, open_fds, sym, tree, wh


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, str, str]]:
    """Everything under root except `skip`: (mode, nlink, mtime_ns, content hash or link).

    The directory holding `skip` is listed without its own times and link count,
    which creating and removing `skip` legitimately change.
    """
    out: dict[str, tuple[int, int, str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if p == skip:
                continue
            st = p.lstat()
            if p.is_symlink():
                content = "->" + os.readlink(p)
            elif p.is_file():
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                content = ""
            if p == skip.parent:
                out[str(p.relative_to(root))] = (st.st_mode, 0, "", content)
                continue
            out[str(p.relative_to(root))] = (st.st_mode, st.st_nlink, str(st.st_mtime_ns), content)
    return out


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """tmp/sandbox holds victims next to the destination tmp/sandbox/dest."""
    sb = tmp_path / "sandbox"
    sb.mkdir()
    (sb / "victim").write_bytes(b"precious")
    (sb / "victimdir").mkdir()
    (sb / "victimdir" / "inner").write_bytes(b"inner")
    return sb


EVIL: dict[str, list[E]] = {
    "dotdot": [f("../evil", b"x")],
    "dotdot-after-normalising": [d("a"), f("a/../../evil", b"x")],
    "absolute-dotdot": [f("/../evil", b"x")],
    "dotdot-dir": [d("../evildir")],
    "dotdot-symlink-name": [sym("../evil", "/etc/passwd")],
    "write-through-symlink-dotdot": [sym("up", ".."), f("up/evil", b"x")],
    "write-through-absolute-symlink": [sym("v", "SANDBOX/victimdir"), f("v/evil", b"x")],
    "overwrite-through-symlink": [sym("v", "SANDBOX"), f("v/victim", b"pwned")],
    "mkdir-through-symlink": [sym("v", "SANDBOX"), d("v/evildir")],
    "symlink-through-symlink": [sym("v", "SANDBOX"), sym("v/evil", "/")],
    "chained-symlinks": [sym("a", "b"), sym("b", "../.."), f("a/evil", b"x")],
    "symlink-deep-in-path": [d("x"), d("x/y"), sym("x/y/z", "SANDBOX"), f("x/y/z/w/evil", b"x")],
    "hardlink-dotdot": [hard("hl", "../victim")],
    "hardlink-absolute-host-file": [hard("hl", "/etc/passwd")],
    "hardlink-through-symlink": [sym("v", "SANDBOX"), hard("hl", "v/victim")],
    "hardlink-through-dotdot-symlink": [sym("up", ".."), hard("hl", "up/victim")],
    "hardlink-missing-target": [hard("hl", "nothing")],
    "hardlink-to-directory": [d("dir"), hard("hl", "dir")],
    "hardlink-to-itself": [hard("hl", "hl")],
    "whiteout-through-symlink": [sym("v", "SANDBOX"), wh("v/victim")],
    "opaque-through-symlink": [sym("v", "SANDBOX/victimdir"), opaque("v")],
    "whiteout-of-dotdot": [f(".wh..."), f("a", b"x")],
    "whiteout-of-dot": [d("a"), f("a/.wh..")],
    "fifo-through-symlink": [sym("v", "SANDBOX"), E("v/evilfifo", b"6")],
    "file-below-a-file": [f("plain", b"x"), f("plain/evil", b"x")],
    "root-as-a-file": [f("./", b"x")],
    "nul-in-symlink-target": [E("s", b"2", mode=0o777, pax={"linkpath": "a\0b"})],
    "nul-in-name": [f("a", pax={"path": "a\0/../../evil"})],
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_evil_layer_is_refused_and_leaves_nothing(sandbox: Path, case: str) -> None:
    entries = [
        E(
            e.name,
            e.kind,
            e.data,
            e.mode,
            link=e.link.replace("SANDBOX", str(sandbox)),
            pax=e.pax,
        )
        for e in EVIL[case]
    ]
    dest = sandbox / "dest"
    blob, media, diff_id = layer(sandbox.parent, entries)
    before = snapshot(sandbox.parent, dest)
    fds = open_fds()
    with pytest.raises(LayerError):
        unpack_layer(blob, media, dest, diff_id)
    assert not dest.exists()
    assert snapshot(sandbox.parent, dest) == before
    assert (sandbox / "victim").read_bytes() == b"precious"
    assert open_fds() == fds


def test_absolute_names_land_inside(sandbox: Path) -> None:
    dest = sandbox / "dest"
    blob, media, diff_id = layer(
        sandbox.parent, [d("/etc"), f("/etc/passwd", b"root:x:0:0::/:/bin/sh\n"), f("//x", b"y")]
    )
    before = snapshot(sandbox.parent, dest)
    unpack_layer(blob, media, dest, diff_id)
    assert (dest / "etc/passwd").read_bytes().startswith(b"root:x")
    assert (dest / "x").read_bytes() == b"y"
    assert snapshot(sandbox.parent, dest) == before


def test_entries_replace_symlinks_instead_of_following_them(sandbox: Path) -> None:
    dest = sandbox / "dest"
    blob, media, diff_id = layer(
        sandbox.parent,
        [
            sym("f", str(sandbox / "victim")),
            f("f", b"replaced"),  # a file over the symlink
            sym("dd", str(sandbox / "victimdir")),
            d("dd"),  # a directory over the symlink
            f("dd/new", b"n"),
            sym("l", str(sandbox)),
            sym("l", "elsewhere"),  # a symlink over the symlink
            sym("h", str(sandbox / "victim")),
            hard("hl", "h"),  # a hard link to the symlink itself, not to its target
        ],
    )
    before = snapshot(sandbox.parent, dest)
    unpack_layer(blob, media, dest, diff_id)
    assert snapshot(sandbox.parent, dest) == before
    got = tree(dest)
    assert got["f"] == "f 0o644 replaced"
    assert got["dd"] == "d 0o755"
    assert got["dd/new"] == "f 0o644 n"
    assert got["l"] == "l elsewhere"
    assert got["hl"] == f"l {sandbox / 'victim'}"
    assert (sandbox / "victim").stat().st_nlink == 1


def test_dotdot_inside_the_layer_is_normalised(sandbox: Path) -> None:
    dest = sandbox / "dest"
    blob, media, diff_id = layer(sandbox.parent, [d("a"), f("a/../b", b"b"), f("./c/./d", b"d")])
    unpack_layer(blob, media, dest, diff_id)
    assert tree(dest) == {
        "a": "d 0o755",
        "b": "f 0o644 b",
        "c": "d 0o755",
        "c/d": "f 0o644 d",
    }


def test_symlink_swapped_for_a_directory_later_is_safe(sandbox: Path) -> None:
    """A parent cached as a directory and then replaced by a symlink is re-checked."""
    dest = sandbox / "dest"
    blob, media, diff_id = layer(
        sandbox.parent,
        [d("p"), f("p/one", b"1"), sym("p", str(sandbox)), f("p/victim", b"pwned")],
    )
    with pytest.raises(LayerError, match="symlink"):
        unpack_layer(blob, media, dest, diff_id)
    assert (sandbox / "victim").read_bytes() == b"precious"
    assert not dest.exists()
