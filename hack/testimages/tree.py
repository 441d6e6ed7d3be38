"""The expected root filesystem after applying layers, for exact comparisons.

The format (written as JSON beside each image in the cache) is::

    {"version": 1, "entries": {"/abs/path": {...}, ...}}

with one record per path (the root itself is not listed):

- file:    type, mode, uid, gid, size, sha256 (hex), xattrs (only when set),
           hardlink_to (only on the second and later names of a hard link)
- dir:     type, mode, uid, gid
- symlink: type, uid, gid, target
- char / block: type, mode, uid, gid, major, minor
- fifo:    type, mode, uid, gid

``mode`` is the permission bits including setuid/setgid/sticky (stat.S_IMODE).
Layers are applied as the OCI image spec says: a layer's whiteouts remove
paths of the lower layers only (``.wh.NAME`` removes NAME and all below it,
``.wh..wh..opq`` empties its directory of lower-layer content), then its
other entries are added; a non-directory replacing a directory removes the
directory's subtree.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hack.testimages.tarlayer import OPAQUE_MARKER, WHITEOUT_PREFIX, Entry, EntryType

TREE_FORMAT_VERSION = 1
Tree = dict[str, dict[str, Any]]


def _abs(path: str) -> str:
    return posixpath.normpath("/" + path.strip("/"))


def _remove_subtree(tree: Tree, path: str, keep_self: bool = False) -> None:
    prefix = path.rstrip("/") + "/"
    for key in [k for k in tree if k.startswith(prefix)]:
        del tree[key]
    if not keep_self:
        tree.pop(path, None)


def _ensure_parents(tree: Tree, path: str) -> None:
    parent = posixpath.dirname(path)
    while parent != "/" and parent not in tree:
        tree[parent] = {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0}
        parent = posixpath.dirname(parent)


def describe(entry: Entry) -> dict[str, Any]:
    """The tree record of one (non-whiteout, non-hardlink) entry."""
    base: dict[str, Any] = {"type": entry.type.value, "uid": entry.uid, "gid": entry.gid}
    if entry.type is EntryType.SYMLINK:
        base["target"] = entry.linkname
        return base
    base["mode"] = entry.mode & 0o7777
    if entry.type is EntryType.FILE:
        base["size"] = len(entry.data)
        base["sha256"] = hashlib.sha256(entry.data).hexdigest()
        if entry.xattrs:
            base["xattrs"] = dict(sorted(entry.xattrs.items()))
    elif entry.type in (EntryType.CHAR, EntryType.BLOCK):
        base["major"] = entry.devmajor
        base["minor"] = entry.devminor
    return base


def apply_layer(tree: Tree, entries: Sequence[Entry]) -> None:
    """Apply one layer's entries to ``tree`` in place."""
    for entry in entries:
        if not entry.is_whiteout:
            continue
        path = _abs(entry.path)
        parent, name = posixpath.dirname(path), posixpath.basename(path)
        if name == OPAQUE_MARKER:
            _remove_subtree(tree, parent, keep_self=True)
        else:
            _remove_subtree(tree, posixpath.join(parent, name[len(WHITEOUT_PREFIX):]))
    for entry in entries:
        if entry.is_whiteout:
            continue
        path = _abs(entry.path)
        if path == "/":
            continue
        old = tree.get(path)
        if old is not None and old["type"] == "dir" and entry.type is not EntryType.DIR:
            _remove_subtree(tree, path)
        _ensure_parents(tree, path)
        if entry.type is EntryType.HARDLINK:
            target = _abs(entry.linkname)
            record = dict(tree[target])
            record["hardlink_to"] = tree[target].get("hardlink_to", target)
            tree[path] = record
        else:
            tree[path] = describe(entry)


def build_tree(layers: Iterable[Sequence[Entry]]) -> Tree:
    tree: Tree = {}
    for entries in layers:
        apply_layer(tree, entries)
    return dict(sorted(tree.items()))


def write_tree(tree: Tree, path: Path) -> None:
    doc = {"version": TREE_FORMAT_VERSION, "entries": tree}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def load_tree(path: Path) -> Tree:
    doc = json.loads(path.read_text())
    if doc.get("version") != TREE_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported tree format version {doc.get('version')!r}")
    entries: Tree = doc["entries"]
    return entries
