"""Users and groups of an image: /etc/passwd and /etc/group read inside a rootfs.

The rootfs is untrusted: its /etc/passwd may be a symlink to ``/etc/passwd``
(meaning the container's own file, not the host's) or to ``../../../..``.
:func:`resolve_in_root` follows symlinks the way the kernel would inside a
chroot at the rootfs, so nothing outside the rootfs is ever opened; the final
file is opened with O_NOFOLLOW and must be a regular file.

:func:`resolve_user` turns the CRI/OCI notion of "the user" (a uid or name,
optionally with a gid or group name) into numeric ids plus the supplementary
groups, the way containerd does.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cri.errors import InvalidArgument

_MAX_SYMLINKS: Final = 255
_MAX_FILE_BYTES: Final = 16 * 1024 * 1024
_MAX_ID: Final = 0xFFFFFFFE  # (uid_t)-1 is "no id"


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedUser:
    """Numeric identity of the container process."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    username: str = ""  # the passwd name, when the uid has one
    home: str = ""


@dataclass(frozen=True)
class UserRequest:
    """What the client and the image ask for; the first non-empty source wins.

    ``user``/``group`` are the image config's ``User`` split at ':' (names or
    numbers); ``uid``/``username``/``gid`` come from the CRI security context.
    """

    uid: int | None = None
    username: str = ""
    gid: int | None = None
    image_user: str = ""
    supplemental_groups: tuple[int, ...] = ()
    strict_groups: bool = False  # SupplementalGroupsPolicy Strict


def resolve_in_root(root: str, path: str) -> str:
    """Host path of ``path`` as seen from inside ``root``, symlinks resolved within it.

    ``..`` never climbs above ``root`` and an absolute link target restarts at
    ``root``. From the first component that does not exist on, the rest is
    kept without its ``..`` (opening the result then fails with ENOENT). More
    than 255 links → OSError(ELOOP).
    """
    root = os.path.realpath(root)
    pending = [c for c in path.split("/") if c]
    resolved: list[str] = []
    links = 0
    while pending:
        comp = pending.pop(0)
        if comp == ".":
            continue
        if comp == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, comp)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            # Nothing below a missing component exists either; dropping the
            # remaining '..' keeps the (non-existent) result inside root.
            rest = [c for c in pending if c not in (".", "..")]
            return os.path.join(root, *resolved, comp, *rest)
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(comp)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many levels of symbolic links", path)
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending = [c for c in target.split("/") if c] + pending
    return os.path.join(root, *resolved)


def read_file_in_root(root: str, path: str) -> str | None:
    """Text of the regular file ``path`` inside ``root``; None when it does not exist."""
    host_path = resolve_in_root(root, path)
    try:
        fd = os.open(host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{path} in the image is not a regular file")
        if st.st_size > _MAX_FILE_BYTES:
            raise InvalidArgument(f"{path} in the image is larger than 16 MiB")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def _parse_id(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def parse_passwd(text: str) -> list[PasswdEntry]:
    """Entries of a passwd(5) file; comments, NIS lines and malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        if not line or line.startswith(("#", "+", "-")):
            continue
        parts = line.split(":")
        if len(parts) < 4:
            continue
        uid, gid = _parse_id(parts[2]), _parse_id(parts[3])
        if uid is None or gid is None or not parts[0]:
            continue
        entries.append(PasswdEntry(parts[0], uid, gid, parts[5] if len(parts) > 5 else ""))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    """Entries of a group(5) file; comments, NIS lines and malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        if not line or line.startswith(("#", "+", "-")):
            continue
        parts = line.split(":")
        if len(parts) < 3:
            continue
        gid = _parse_id(parts[2])
        if gid is None or not parts[0]:
            continue
        members = tuple(m.strip() for m in parts[3].split(",") if m.strip()) if len(
            parts
        ) > 3 else ()
        entries.append(GroupEntry(parts[0], gid, members))
    return entries


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for i in ids:
        seen.setdefault(i, None)
    return tuple(seen)


def _check_id(value: int, what: str) -> int:
    if not 0 <= value <= _MAX_ID:
        raise InvalidArgument(f"{what} {value} is out of range")
    return value


def resolve_user(rootfs: str, request: UserRequest) -> ResolvedUser:
    """Resolve the container's uid, gid and supplementary groups.

    The user is the CRI ``run_as_username``, else ``run_as_user``, else the
    image's ``User`` (``name``, ``uid``, ``name:group``, ``uid:gid``...), else
    root. A name must exist in the image's /etc/passwd (InvalidArgument
    otherwise); a numeric uid need not, and then has gid 0. The gid is the CRI
    ``run_as_group``, else the image's group part, else the passwd entry's.
    Supplementary groups are the primary gid, then (unless the policy is
    Strict) every /etc/group entry listing the user's name, then the CRI
    ``supplemental_groups``, without duplicates.
    """
    image_user, _, image_group = request.image_user.partition(":")
    if request.username:
        user_spec = request.username
    elif request.uid is not None:
        user_spec = str(_check_id(request.uid, "run_as_user"))
    else:
        user_spec = image_user
    if request.gid is not None:
        group_spec = str(_check_id(request.gid, "run_as_group"))
    elif request.username or request.uid is not None:
        group_spec = ""  # a CRI user without a group: its passwd gid, not the image's
    else:
        group_spec = image_group

    users = parse_passwd(read_file_in_root(rootfs, "/etc/passwd") or "")
    groups = parse_group(read_file_in_root(rootfs, "/etc/group") or "")

    entry: PasswdEntry | None = None
    if not user_spec:
        uid = 0
        entry = next((u for u in users if u.uid == 0), None)
    elif (numeric := _parse_id(user_spec)) is not None:
        uid = numeric
        entry = next((u for u in users if u.uid == uid), None)
    else:
        entry = next((u for u in users if u.name == user_spec), None)
        if entry is None:
            raise InvalidArgument(
                f"user {user_spec!r} not found in the image's /etc/passwd"
            )
        uid = entry.uid

    if not group_spec:
        gid = entry.gid if entry else 0
    elif (numeric := _parse_id(group_spec)) is not None:
        gid = numeric
    else:
        group = next((g for g in groups if g.name == group_spec), None)
        if group is None:
            raise InvalidArgument(f"group {group_spec!r} not found in the image's /etc/group")
        gid = group.gid

    extra: list[int] = [gid]
    username = entry.name if entry else ""
    if not request.strict_groups and username:
        extra.extend(g.gid for g in groups if username in g.members)
    extra.extend(_check_id(g, "supplemental group") for g in request.supplemental_groups)
    return ResolvedUser(
        uid=uid,
        gid=gid,
        additional_gids=_unique(extra),
        username=username,
        home=entry.home if entry else "",
    )
