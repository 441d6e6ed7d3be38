"""The expected-tree model applies whiteouts and opaque markers as the OCI spec says."""

from __future__ import annotations

import io
import tarfile

from hack.testimages.tarlayer import (
    build_tar,
    directory,
    file,
    hardlink,
    opaque,
    symlink,
    whiteout,
)
from hack.testimages.tree import build_tree


def test_whiteout_removes_lower_subtree_only() -> None:
    tree = build_tree([
        [directory("d"), directory("d/sub"), file("d/sub/x", "x"), file("d/y", "y")],
        [whiteout("d/sub"), directory("d/sub"), file("d/sub/new", "n")],
    ])
    assert sorted(tree) == ["/d", "/d/sub", "/d/sub/new", "/d/y"]


def test_opaque_keeps_same_layer_entries_in_any_order() -> None:
    tree = build_tree([
        [directory("o"), file("o/old", "old")],
        [file("o/new", "new"), opaque("o")],  # marker after the new entry
    ])
    assert sorted(tree) == ["/o", "/o/new"]


def test_file_replacing_directory_drops_its_subtree() -> None:
    tree = build_tree([
        [directory("p"), file("p/child", "c")],
        [file("p", "now a file")],
    ])
    assert sorted(tree) == ["/p"] and tree["/p"]["type"] == "file"


def test_hardlink_and_symlink_records() -> None:
    tree = build_tree([[file("a", "same"), hardlink("b", "a"), hardlink("c", "b"),
                        symlink("s", "a")]])
    assert tree["/b"]["hardlink_to"] == "/a" and tree["/c"]["hardlink_to"] == "/a"
    assert tree["/b"]["sha256"] == tree["/a"]["sha256"]
    assert tree["/s"] == {"type": "symlink", "target": "a", "uid": 0, "gid": 0}


def test_missing_parents_are_implied() -> None:
    tree = build_tree([[file("x/y/z", "z")]])
    assert tree["/x"]["type"] == tree["/x/y"]["type"] == "dir"


def test_tar_is_deterministic_and_keeps_metadata() -> None:
    entries = [directory("d", mode=0o700, uid=5, gid=6),
               file("d/f", "data", mode=0o640, uid=1000, gid=1000, xattrs={"user.k": "v"})]
    raw = build_tar(entries)
    assert raw == build_tar(entries)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        f = tar.getmember("d/f")
        assert (f.mode, f.uid, f.gid, f.uname, f.mtime) == (0o640, 1000, 1000, "", 946684800)
        assert f.pax_headers["SCHILY.xattr.user.k"] == "v"
