"""Platforms: the host's (os/architecture/variant, GOARCH names) and picking an
image manifest for it out of an OCI index or a Docker manifest list.

Matching follows containerd's defaults for a Linux host: the OS must be equal;
the architecture must be equal; ARM variants are compatible downwards (a v7
host runs v7, then v6, then v5 images), arm64's ``v8`` and amd64's ``v1`` are
the same as no variant.  Index entries without a platform are accepted after
every explicit match (containerd accepts them too); entries that are not
manifests (attestations, unknown/unknown) are skipped.  A manifest that is
not in an index is checked against its config's os/architecture instead.
"""

from __future__ import annotations

import platform as _pyplatform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cri.errors import NotFound

# platform.machine() → GOARCH, variant
_MACHINE_TO_GOARCH: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "loongarch64": ("loong64", ""),
}

# Variants that mean "no variant" for an architecture.
_DEFAULT_VARIANT = {"arm64": "v8", "amd64": "v1"}
_ARM_VARIANTS = ["v8", "v7", "v6", "v5"]


class PlatformNotFound(NotFound):
    """The index has no manifest for the requested platform."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return out + f"/{self.variant}" if self.variant else out

    def normalized(self) -> Platform:
        os_name = self.os.lower()
        arch, variant = self.architecture.lower(), self.variant.lower()
        if arch in ("x86_64", "x86-64"):
            arch = "amd64"
        elif arch == "aarch64":
            arch = "arm64"
        elif arch in ("armhf", "armel"):
            arch, variant = "arm", variant or ("v7" if arch == "armhf" else "v6")
        if _DEFAULT_VARIANT.get(arch) == variant:
            variant = ""
        if arch == "arm" and not variant:
            variant = "v7"
        return Platform(os_name, arch, variant)


def host_platform() -> Platform:
    """The platform of this machine, in Go's names (``linux/amd64``, ``linux/arm/v7``)."""
    machine = _pyplatform.machine().lower()
    arch, variant = _MACHINE_TO_GOARCH.get(machine, (machine, ""))
    return Platform("linux", arch, variant)


def compatible_platforms(want: Platform) -> list[Platform]:
    """The platforms ``want`` can run, best first."""
    want = want.normalized()
    if want.architecture == "arm" and want.variant in _ARM_VARIANTS:
        start = _ARM_VARIANTS.index(want.variant)
        return [Platform(want.os, "arm", v) for v in _ARM_VARIANTS[start:]]
    return [want]


def platform_from_json(value: Mapping[str, Any] | None) -> Platform | None:
    """An OCI descriptor's ``platform`` object, or None when absent/invalid."""
    if not isinstance(value, Mapping):
        return None
    os_name, arch = value.get("os"), value.get("architecture")
    variant = value.get("variant") or ""
    if not isinstance(os_name, str) or not isinstance(arch, str) or not isinstance(variant, str):
        return None
    return Platform(os_name, arch, variant)


def select_manifest(
    manifests: Sequence[Mapping[str, Any]],
    want: Platform,
    manifest_media_types: frozenset[str],
    what: str,
) -> Mapping[str, Any]:
    """Pick the descriptor for ``want`` from an index's ``manifests`` list.

    ``manifest_media_types`` are the media types that may be selected (image
    manifests and nested indexes); ``what`` names the index in errors.  Raises
    PlatformNotFound listing the platforms that are available.
    """
    ranking = compatible_platforms(want)
    best: tuple[int, int] | None = None
    chosen: Mapping[str, Any] | None = None
    available: list[str] = []
    for position, desc in enumerate(manifests):
        if desc.get("mediaType") not in manifest_media_types:
            continue
        plat = platform_from_json(desc.get("platform"))
        if plat is None:
            rank = len(ranking)  # after every explicit match
        else:
            if plat.os == "unknown" or plat.architecture == "unknown":
                continue  # attestation manifests
            available.append(str(plat))
            try:
                rank = ranking.index(plat.normalized())
            except ValueError:
                continue
        key = (rank, position)
        if best is None or key < best:
            best, chosen = key, desc
    if chosen is None:
        listed = ", ".join(sorted(set(available))) or "none"
        raise PlatformNotFound(
            f"no image for platform {want} in {what}; available platforms: {listed}"
        )
    return chosen


def check_config_platform(config: Mapping[str, Any], want: Platform, what: str) -> None:
    """Refuse an image config built for another platform (a manifest outside any index).

    A config that does not say its os/architecture is accepted.
    """
    plat = platform_from_json(config)
    if plat is None or not plat.os or not plat.architecture:
        return
    if plat.normalized() not in compatible_platforms(want):
        raise PlatformNotFound(f"{what} is an image for {plat}, not for platform {want}")
