"""Linux capability names and numbers, and the set algebra CRI asks for.

Names are kept in their canonical kernel form, ``CAP_<NAME>`` in upper case.
Clients may write them with or without the ``CAP_`` prefix and in any case;
:func:`normalize` turns every accepted spelling into the canonical one and
refuses anything else with InvalidArgument.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from cri.errors import InvalidArgument

# Every capability the kernel defines, with its bit number (include/uapi/linux/capability.h).
CAPABILITIES: Final[dict[str, int]] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}

_BY_NUMBER: Final[dict[int, str]] = {num: name for name, num in CAPABILITIES.items()}

# The set a non-privileged container gets when the client adds or drops nothing.
# crib uses containerd's 14 (CRI-O's default is the first nine of these, without
# MKNOD, NET_RAW, SYS_CHROOT, AUDIT_WRITE and SETFCAP): images built for Docker
# expect ping, chroot and mknod to work as they do under Docker.
DEFAULT_CAPABILITIES: Final[tuple[str, ...]] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

ALL: Final = "ALL"


def normalize(name: str) -> str:
    """Return the canonical ``CAP_X`` spelling of ``name``; InvalidArgument if unknown."""
    upper = name.strip().upper()
    canonical = upper if upper.startswith("CAP_") else "CAP_" + upper
    if canonical not in CAPABILITIES:
        raise InvalidArgument(f"unknown capability {name!r}")
    return canonical


def is_all(name: str) -> bool:
    """True for the CRI wildcard ``ALL`` (any case, ``CAP_ALL`` accepted too)."""
    upper = name.strip().upper()
    return upper in (ALL, "CAP_ALL")


def sort_caps(caps: Iterable[str]) -> list[str]:
    """Canonical names ordered by capability number (stable, readable specs)."""
    return sorted(set(caps), key=lambda c: CAPABILITIES[c])


def parse_mask(mask: str | int) -> frozenset[str]:
    """Names of the known capabilities whose bits are set in ``mask`` (hex string or int).

    Bits the table does not know (capabilities of a newer kernel) are left out:
    no runtime crib drives could name them either.
    """
    if isinstance(mask, str):
        try:
            value = int(mask.strip(), 16)
        except ValueError:
            raise InvalidArgument(f"capability mask {mask!r} is not hexadecimal") from None
    else:
        value = mask
    return frozenset(name for num, name in _BY_NUMBER.items() if value >> num & 1)


def to_mask(caps: Iterable[str]) -> int:
    """The bit mask of canonical capability names (as /proc/<pid>/status shows it)."""
    mask = 0
    for cap in caps:
        mask |= 1 << CAPABILITIES[cap]
    return mask


def read_bounding_set(status_path: str = "/proc/self/status") -> frozenset[str]:
    """The calling process's bounding set (``CapBnd``), read once at daemon start-up."""
    with open(status_path, encoding="ascii") as status:
        for line in status:
            if line.startswith("CapBnd:"):
                return parse_mask(line.split(":", 1)[1])
    raise InvalidArgument(f"no CapBnd line in {status_path}")


def resolve(
    add: Iterable[str],
    drop: Iterable[str],
    bounding: frozenset[str],
    defaults: Iterable[str] = DEFAULT_CAPABILITIES,
) -> frozenset[str]:
    """The capability set of a non-privileged container, as containerd computes it.

    ``ALL`` is applied first (add ALL = the host's bounding set, drop ALL = none),
    then the individual adds, then the individual drops, so that
    ``add=[ALL], drop=[CHOWN]`` is everything but CHOWN and
    ``drop=[ALL], add=[NET_BIND_SERVICE]`` is just that one. Unknown names are
    InvalidArgument. The caller intersects the result with the bounding set.
    """
    add = list(add)
    drop = list(drop)
    caps = {normalize(c) for c in defaults}
    if any(is_all(c) for c in add):
        caps |= bounding
    if any(is_all(c) for c in drop):
        caps.clear()
    caps |= {normalize(c) for c in add if not is_all(c)}
    caps -= {normalize(c) for c in drop if not is_all(c)}
    return frozenset(caps)
