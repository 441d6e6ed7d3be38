"""Pinned images: the ``image.pinned_images`` patterns and which images they match.

A pinned image is reported with ``pinned = true`` by ImageStatus, ListImages
and StreamImages; the kubelet's image garbage collector never removes it.
(RemoveImage itself still removes it when asked, as CRI-O and containerd do.)

Three kinds of pattern, as CRI-O's ``pinned_images``:

- exact: ``registry.k8s.io/pause:3.10`` matches that whole name.  A pattern
  that is a valid reference is normalised first, so ``busybox`` means
  ``docker.io/library/busybox:latest``; an image id (``sha256:<hex>``) matches
  the image with that id;
- glob, a ``*`` at the end: ``registry.k8s.io/pause*`` matches every name that
  starts with ``registry.k8s.io/pause`` (``*`` alone pins everything);
- keyword, a ``*`` at both ends: ``*pause*`` matches every name containing
  ``pause``.

Names are an image's repo tags and repo digests.  Matching is computed when an
image is reported, so a SIGHUP that changes the list takes effect at once;
nothing about pinning is stored.  The pattern syntax is checked when the
configuration is loaded (``cri.config``); :func:`pattern_error` is that check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from cri.errors import InvalidArgument
from imageservice.reference import parse_image_id, parse_reference


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid pinned-image pattern, or None when it is."""
    if not pattern or pattern != pattern.strip():
        return f"{pattern!r} is empty or has surrounding spaces"
    inner = pattern
    if len(pattern) > 2 and pattern.startswith("*") and pattern.endswith("*"):
        inner = pattern[1:-1]
    elif pattern.endswith("*"):
        inner = pattern[:-1]
    if "*" in inner:
        return (f"{pattern!r}: '*' is allowed only at the end (glob) or at both ends "
                "(keyword)")
    return None


@dataclass(frozen=True)
class PinnedImages:
    """Compiled ``image.pinned_images`` patterns."""

    exact: frozenset[str] = field(default_factory=frozenset)
    prefixes: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> PinnedImages:
        """Compile the patterns; raises InvalidArgument naming a malformed one."""
        exact: set[str] = set()
        prefixes: list[str] = []
        keywords: list[str] = []
        for pattern in patterns:
            problem = pattern_error(pattern)
            if problem is not None:
                raise InvalidArgument(f"image.pinned_images: {problem}")
            if len(pattern) > 2 and pattern.startswith("*") and pattern.endswith("*"):
                keywords.append(pattern[1:-1])
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
                exact.add(_normalised(pattern))
        return cls(frozenset(exact), tuple(prefixes), tuple(keywords))

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes or self.keywords)

    def matches(self, image_id: str, names: Iterable[str]) -> bool:
        """Whether the image with this id and these repo tags/digests is pinned."""
        if image_id in self.exact:
            return True
        for name in names:
            if name in self.exact:
                return True
            if any(name.startswith(p) for p in self.prefixes):
                return True
            if any(k in name for k in self.keywords):
                return True
        return False


def _normalised(pattern: str) -> str:
    image_id = parse_image_id(pattern)
    if image_id is not None:
        return image_id
    try:
        return parse_reference(pattern).canonical().string()
    except InvalidArgument:
        return pattern  # not a reference: matched literally
