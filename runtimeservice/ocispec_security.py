"""Security settings of a container: capabilities, seccomp, AppArmor, masked paths.

Privileged containers get every capability of the host's bounding set, no
seccomp filter, no AppArmor profile and no masked or read-only /proc paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument
from runtimeservice import capabilities as capmod
from runtimeservice import seccomp

log = logging.getLogger(__name__)

DEFAULT_MASKED_PATHS: Final[tuple[str, ...]] = (
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS: Final[tuple[str, ...]] = (
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# How a profile choice is reported back (the CRI's legacy string forms).
UNCONFINED: Final = "unconfined"
RUNTIME_DEFAULT: Final = "runtime/default"
LOCALHOST_PREFIX: Final = "localhost/"


@dataclass(frozen=True)
class CapabilitySets:
    """The process capability sets, canonical names ordered by number."""

    bounding: tuple[str, ...]
    ambient: tuple[str, ...] = ()

    def to_oci(self) -> dict[str, list[str]]:
        caps = list(self.bounding)
        return {
            "bounding": caps,
            "effective": caps,
            "permitted": caps,
            # Inheritable stays empty (CVE-2022-24769) except for what must be
            # ambient: the kernel keeps only ambient caps that are inheritable.
            "inheritable": list(self.ambient),
            "ambient": list(self.ambient),
        }


def capability_sets(
    sc: api_pb2.LinuxContainerSecurityContext, privileged: bool, host_bounding: frozenset[str]
) -> CapabilitySets:
    """The container's capabilities, limited to what the host can grant."""
    if privileged:
        return CapabilitySets(tuple(capmod.sort_caps(host_bounding)))
    requested = sc.capabilities
    caps = capmod.resolve(requested.add_capabilities, requested.drop_capabilities, host_bounding)
    ambient: set[str] = set()
    for name in requested.add_ambient_capabilities:
        if capmod.is_all(name):
            raise InvalidArgument("ALL is not allowed in add_ambient_capabilities")
        ambient.add(capmod.normalize(name))
    wanted = caps | ambient
    missing = wanted - host_bounding
    if missing:
        log.warning(
            "capabilities %s are not in the host's bounding set and are left out",
            ", ".join(capmod.sort_caps(missing)),
        )
    return CapabilitySets(
        tuple(capmod.sort_caps(wanted & host_bounding)),
        tuple(capmod.sort_caps(ambient & host_bounding)),
    )


def _profile_choice(
    sc: api_pb2.LinuxContainerSecurityContext, field: str, legacy: str
) -> tuple[str, str]:
    """(kind, ref) from a SecurityProfile field or its deprecated string form.

    kind is UNCONFINED, RUNTIME_DEFAULT, LOCALHOST_PREFIX or "" (nothing asked).
    """
    if sc.HasField(field):
        profile: api_pb2.SecurityProfile = getattr(sc, field)
        if profile.profile_type == api_pb2.SecurityProfile.RuntimeDefault:
            return RUNTIME_DEFAULT, ""
        if profile.profile_type == api_pb2.SecurityProfile.Unconfined:
            return UNCONFINED, ""
        return LOCALHOST_PREFIX, profile.localhost_ref
    if not legacy:
        return "", ""
    if legacy == UNCONFINED:
        return UNCONFINED, ""
    if legacy in (RUNTIME_DEFAULT, "docker/default"):
        return RUNTIME_DEFAULT, ""
    if legacy.startswith(LOCALHOST_PREFIX):
        return LOCALHOST_PREFIX, legacy.removeprefix(LOCALHOST_PREFIX)
    raise InvalidArgument(f"unknown {field} profile {legacy!r}")


def seccomp_profile(
    sc: api_pb2.LinuxContainerSecurityContext,
    privileged: bool,
    caps: CapabilitySets,
    *,
    machine: str,
    seccomp_supported: bool = True,
) -> tuple[dict[str, Any] | None, str]:
    """``linux.seccomp`` (None = no filter) and the profile's name for status reports.

    Nothing asked means unconfined, as the CRI says; RuntimeDefault is crib's
    default profile; Localhost is the JSON file at an absolute path.
    """
    kind, ref = _profile_choice(sc, "seccomp", sc.seccomp_profile_path)
    if privileged or kind in ("", UNCONFINED):
        return None, UNCONFINED
    if kind == RUNTIME_DEFAULT:
        if not seccomp_supported:
            log.warning("seccomp is not available on this host: RuntimeDefault not applied")
            return None, UNCONFINED
        return seccomp.default_profile(caps.bounding, machine), RUNTIME_DEFAULT
    if not ref:
        raise InvalidArgument("seccomp Localhost profile has an empty localhost_ref")
    if not seccomp_supported:
        raise FailedPrecondition(
            f"seccomp profile {ref!r} requested but seccomp is not available on this host"
        )
    return seccomp.load_localhost_profile(ref, caps.bounding, machine), LOCALHOST_PREFIX + ref


def apparmor_profile(
    sc: api_pb2.LinuxContainerSecurityContext,
    privileged: bool,
    *,
    apparmor_supported: bool,
    default_profile: str,
) -> str | None:
    """``process.apparmorProfile`` (None = leave unset).

    On a host without AppArmor, asking for any profile but unconfined is
    FailedPrecondition: silently running unconfined would be a lie.
    """
    kind, ref = _profile_choice(sc, "apparmor", sc.apparmor_profile)
    if not apparmor_supported:
        if kind in (RUNTIME_DEFAULT, LOCALHOST_PREFIX):
            what = ref or "RuntimeDefault"
            raise FailedPrecondition(
                f"AppArmor profile {what!r} requested but AppArmor is not enabled on this host"
            )
        return None
    if privileged or kind == UNCONFINED:
        return UNCONFINED if kind == UNCONFINED else None
    if kind == LOCALHOST_PREFIX:
        if not ref:
            raise InvalidArgument("AppArmor Localhost profile has an empty localhost_ref")
        return ref
    return default_profile


def masked_and_readonly_paths(
    sc: api_pb2.LinuxContainerSecurityContext, privileged: bool
) -> tuple[list[str], list[str]]:
    """The defaults, or exactly the CRI's lists when given; none when privileged."""
    if privileged:
        return [], []
    masked = list(sc.masked_paths) or list(DEFAULT_MASKED_PATHS)
    readonly = list(sc.readonly_paths) or list(DEFAULT_READONLY_PATHS)
    for path in masked + readonly:
        if not path.startswith("/"):
            raise InvalidArgument(f"masked/readonly path {path!r} is not absolute")
    return masked, readonly
