from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cri.errors import InvalidArgument
from runtimeservice.userdb import (
    UserRequest,
    parse_group,
    parse_passwd,
    read_file_in_root,
    resolve_in_root,
    resolve_user,
)

PASSWD = """\
# comment
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000::/home/app:/bin/sh
broken line
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
bad:x:notanumber:1::/:/bin/sh
+nis
"""
GROUP = """\
root:x:0:
app:x:1000:
audio:x:29:app
video:x:44:other,app
staff:x:50:
nogroup:x:65534:
"""


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def test_parse_passwd_skips_junk() -> None:
    users = parse_passwd(PASSWD)
    assert [(u.name, u.uid, u.gid) for u in users] == [
        ("root", 0, 0), ("app", 1000, 1000), ("nobody", 65534, 65534)]  # fmt: skip
    assert users[1].home == "/home/app"


def test_parse_group_members() -> None:
    groups = {g.name: g for g in parse_group(GROUP)}
    assert groups["video"].members == ("other", "app")
    assert groups["root"].members == ()


def test_default_is_root(rootfs: Path) -> None:
    user = resolve_user(str(rootfs), UserRequest())
    assert (user.uid, user.gid, user.additional_gids, user.username) == (0, 0, (0,), "root")


def test_username_gets_primary_and_member_groups(rootfs: Path) -> None:
    user = resolve_user(str(rootfs), UserRequest(username="app", supplemental_groups=(1234, 29)))
    assert (user.uid, user.gid) == (1000, 1000)
    assert user.additional_gids == (1000, 29, 44, 1234)


def test_strict_policy_ignores_etc_group(rootfs: Path) -> None:
    user = resolve_user(
        str(rootfs), UserRequest(username="app", supplemental_groups=(1234,), strict_groups=True)
    )
    assert user.additional_gids == (1000, 1234)


def test_numeric_uid_not_in_passwd_has_gid_zero(rootfs: Path) -> None:
    user = resolve_user(str(rootfs), UserRequest(uid=4242))
    assert (user.uid, user.gid, user.additional_gids, user.username) == (4242, 0, (0,), "")


def test_numeric_uid_in_passwd_uses_its_entry(rootfs: Path) -> None:
    user = resolve_user(str(rootfs), UserRequest(uid=1000, gid=50))
    assert (user.uid, user.gid) == (1000, 50)
    assert user.additional_gids == (50, 29, 44)


@pytest.mark.parametrize(
    "image_user, expected",
    [
        ("app", (1000, 1000)),
        ("app:staff", (1000, 50)),
        ("1000:44", (1000, 44)),
        ("nobody:0", (65534, 0)),
        ("123", (123, 0)),
        ("", (0, 0)),
    ],
)
def test_image_user_forms(rootfs: Path, image_user: str, expected: tuple[int, int]) -> None:
    user = resolve_user(str(rootfs), UserRequest(image_user=image_user))
    assert (user.uid, user.gid) == expected


def test_cri_user_overrides_image_user_and_group(rootfs: Path) -> None:
    user = resolve_user(str(rootfs), UserRequest(uid=65534, image_user="app:staff"))
    assert (user.uid, user.gid) == (65534, 65534)


def test_unknown_names_are_invalid(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="'ghost' not found"):
        resolve_user(str(rootfs), UserRequest(username="ghost"))
    with pytest.raises(InvalidArgument, match="group 'ghosts' not found"):
        resolve_user(str(rootfs), UserRequest(image_user="app:ghosts"))


def test_missing_files_numeric_ok_names_not(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_user(str(empty), UserRequest(uid=7)).gid == 0
    with pytest.raises(InvalidArgument):
        resolve_user(str(empty), UserRequest(image_user="app"))


def test_out_of_range_ids(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="out of range"):
        resolve_user(str(rootfs), UserRequest(uid=-1))
    with pytest.raises(InvalidArgument, match="out of range"):
        resolve_user(str(rootfs), UserRequest(uid=0, supplemental_groups=(1 << 32,)))


def test_absolute_symlink_stays_inside_root(tmp_path: Path) -> None:
    """/etc/passwd -> /etc/passwd.real means the rootfs's file, never the host's."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd.real").write_text("inside:x:5:5::/:/bin/sh\n")
    (root / "etc" / "passwd").symlink_to("/etc/passwd.real")
    assert resolve_in_root(str(root), "/etc/passwd") == str(root / "etc" / "passwd.real")
    user = resolve_user(str(root), UserRequest(username="inside"))
    assert user.uid == 5


def test_symlink_to_host_file_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    host_file = tmp_path / "hostpasswd"
    host_file.write_text("hostonly:x:9:9::/:/bin/sh\n")
    (root / "etc" / "passwd").symlink_to(f"../../../../../../..{host_file}")
    assert read_file_in_root(str(root), "/etc/passwd") is None  # resolves inside root: absent
    with pytest.raises(InvalidArgument, match="not found"):
        resolve_user(str(root), UserRequest(username="hostonly"))


def test_symlinked_etc_directory(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "real-etc").mkdir(parents=True)
    (root / "real-etc" / "passwd").write_text("x:x:3:3::/:/bin/sh\n")
    (root / "etc").symlink_to("/real-etc")
    assert resolve_user(str(root), UserRequest(username="x")).uid == 3


def test_symlink_loop(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to("passwd")
    with pytest.raises(OSError) as info:
        resolve_in_root(str(root), "/etc/passwd")
    assert info.value.errno == errno.ELOOP


def test_non_regular_file_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc" / "passwd").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read_file_in_root(str(root), "/etc/passwd")
    os.mkfifo(root / "etc" / "group")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        read_file_in_root(str(root), "/etc/group")


def test_dotdot_is_clamped(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    assert resolve_in_root(str(root), "/../../etc/./passwd") == str(root / "etc" / "passwd")


def test_dotdot_after_missing_component_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to("missing/../../../../../../../../etc/passwd")
    got = resolve_in_root(str(root), "/etc/passwd")
    assert got.startswith(str(root) + "/")
    assert ".." not in got.split("/")
    assert read_file_in_root(str(root), "/etc/passwd") is None


def test_file_used_as_directory(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").write_text("not a dir")
    assert read_file_in_root(str(root), "/etc/passwd") is None
