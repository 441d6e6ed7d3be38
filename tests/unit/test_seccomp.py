from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cri.errors import InvalidArgument
from runtimeservice import capabilities as caps
from runtimeservice import seccomp

DEFAULT_CAPS = caps.DEFAULT_CAPABILITIES


def _allowed(profile: dict[str, Any]) -> set[str]:
    """Syscalls allowed without argument conditions."""
    return {
        n
        for rule in profile["syscalls"]
        if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
        for n in rule["names"]
    }


def _rules_for(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if name in r["names"]]


def test_default_denies_with_eperm_and_names_arches() -> None:
    profile = seccomp.default_profile(DEFAULT_CAPS, "x86_64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    arm = seccomp.default_profile(DEFAULT_CAPS, "aarch64")
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


def test_default_allows_the_ordinary_and_not_the_dangerous() -> None:
    allowed = _allowed(seccomp.default_profile(DEFAULT_CAPS, "x86_64"))
    for name in ("read", "write", "openat", "execve", "futex", "epoll_wait", "ptrace",
                 "arch_prctl", "clock_gettime", "chroot"):  # fmt: skip
        assert name in allowed, name
    for name in ("mount", "umount2", "unshare", "setns", "reboot", "init_module", "kexec_load",
                 "bpf", "keyctl", "add_key", "open_by_handle_at", "clone", "clone3",
                 "set_tls", "iopl"):  # fmt: skip
        assert name not in allowed, name


def test_machine_specific_syscalls() -> None:
    assert "set_tls" in _allowed(seccomp.default_profile(DEFAULT_CAPS, "aarch64"))
    assert "arch_prctl" not in _allowed(seccomp.default_profile(DEFAULT_CAPS, "aarch64"))


def test_capability_conditional_syscalls() -> None:
    profile = seccomp.default_profile([*DEFAULT_CAPS, "CAP_SYS_ADMIN", "CAP_SYS_BOOT"], "x86_64")
    allowed = _allowed(profile)
    for name in ("mount", "umount2", "unshare", "setns", "clone", "clone3", "reboot"):
        assert name in allowed, name
    # With CAP_SYS_ADMIN, no clone restriction and no clone3 ENOSYS rule remain.
    assert all(not r.get("args") for r in _rules_for(profile, "clone"))
    assert all(r["action"] == "SCMP_ACT_ALLOW" for r in _rules_for(profile, "clone3"))
    # chroot follows CAP_SYS_CHROOT.
    no_chroot = [c for c in DEFAULT_CAPS if c != "CAP_SYS_CHROOT"]
    assert "chroot" not in _allowed(seccomp.default_profile(no_chroot, "x86_64"))


def test_clone_restricted_to_no_namespace_flags() -> None:
    profile = seccomp.default_profile(DEFAULT_CAPS, "x86_64")
    (clone,) = _rules_for(profile, "clone")
    (arg,) = clone["args"]
    assert arg == {"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    (clone3,) = _rules_for(profile, "clone3")
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}


def test_socket_and_personality_rules() -> None:
    profile = seccomp.default_profile(DEFAULT_CAPS, "x86_64")
    (sock,) = _rules_for(profile, "socket")
    assert sock["args"] == [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]
    personas = sorted(r["args"][0]["value"] for r in _rules_for(profile, "personality"))
    assert personas == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]


def test_default_profile_is_json_serialisable_and_stable() -> None:
    a = json.dumps(seccomp.default_profile(DEFAULT_CAPS, "x86_64"), sort_keys=True)
    b = json.dumps(seccomp.default_profile(list(reversed(DEFAULT_CAPS)), "x86_64"), sort_keys=True)
    assert a == b


DOCKER_FORM = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    ],
    "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {"name": "getpid", "action": "SCMP_ACT_ALLOW"},
        {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
         "excludes": {"caps": ["CAP_SYS_ADMIN"]}, "comment": "x"},
        {"names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ],
}  # fmt: skip


def test_docker_form_is_resolved(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(DOCKER_FORM))
    out = seccomp.load_localhost_profile(str(path), DEFAULT_CAPS, "x86_64")
    assert out["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]
    assert out["defaultErrnoRet"] == 1
    names = [r["names"] for r in out["syscalls"]]
    assert names == [["read", "write"], ["getpid"], ["arch_prctl"], ["clone"], ["uname"]]
    assert out["syscalls"][3]["args"] == [{"index": 0, "value": 1, "op": "SCMP_CMP_MASKED_EQ"}]
    assert out["syscalls"][4]["errnoRet"] == 38
    assert "comment" not in json.dumps(out)

    admin = seccomp.load_localhost_profile(str(path), ["CAP_SYS_ADMIN"], "aarch64")
    assert admin["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    names = [r["names"] for r in admin["syscalls"]]
    assert names == [["read", "write"], ["getpid"], ["mount"], ["uname"]]


def test_oci_form_passes_through(tmp_path: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["kill"], "action": "SCMP_ACT_ERRNO"}]}  # fmt: skip
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    assert seccomp.load_localhost_profile(str(path), [], "x86_64") == profile


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ("[]", "not a JSON object"),
        ("{}", "defaultAction"),
        ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}', "must be a list"),
        ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ALLOW"}]}',
         "without names"),
    ],
)  # fmt: skip
def test_bad_localhost_profiles(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "p.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument, match=match):
        seccomp.load_localhost_profile(str(path), [], "x86_64")


def test_relative_localhost_path_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not absolute"):
        seccomp.load_localhost_profile("profiles/p.json", [], "x86_64")
