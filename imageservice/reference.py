"""Image references: parsing and normalisation, the way Docker and containerd do it.

The grammar is distribution/reference's::

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [domain "/"] path-component ["/" path-component]*
    domain     := host [":" port]          host: DNS-ish name, IPv4, or [IPv6]
    path-component := [a-z0-9]+ ( separator [a-z0-9]+ )*
    separator  := "." | "_" | "__" | "-"+
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

Normalisation ("familiar" names → full names), as ``ParseNormalizedNamed`` does:
the first path component is a registry domain only when the input has a ``/``
and that component is ``localhost``, contains ``.`` or ``:``, or has an upper
case letter; otherwise the domain is ``docker.io``.  ``index.docker.io`` becomes
``docker.io``, and a one-component docker.io path gets ``library/``.  A reference
with neither tag nor digest gets ``:latest``.

Image ids (a bare 64-hex string or ``sha256:<hex>``) are not references: see
:func:`parse_image_id`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cri.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
MAX_PATH_LENGTH = 255

# Encoded lengths of the digest algorithms we accept (go-digest's registered ones).
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = _ALNUM + r"(?:" + _SEPARATOR + _ALNUM + r")*"
_REMOTE_NAME = _PATH_COMPONENT + r"(?:/" + _PATH_COMPONENT + r")*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = _DOMAIN_COMPONENT + r"(?:\." + _DOMAIN_COMPONENT + r")*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = r"(?:" + _DOMAIN_NAME + "|" + _IPV6 + r")(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

# re.ASCII: Go's \w is ASCII-only; fullmatch() is used everywhere (Python's $
# would accept a trailing newline).
_REFERENCE_RE = re.compile(
    r"((?:" + _DOMAIN + r"/)?" + _REMOTE_NAME + r")(?::(" + _TAG + r"))?(?:@(" + _DIGEST + r"))?",
    re.ASCII,
)
_DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
_TAG_RE = re.compile(_TAG, re.ASCII)
_IDENTIFIER_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference.

    ``tag`` is None only when the reference has a digest and no tag; a reference
    parsed from ``name:tag@digest`` keeps both.  ``qualified`` records whether
    the user's input named its registry (it is not part of equality): short
    names go through registries.conf's search list and aliases.
    """

    domain: str
    path: str
    tag: str | None
    digest: str | None
    qualified: bool = field(default=True, compare=False)

    @property
    def name(self) -> str:
        """``domain/path``, e.g. ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    def string(self) -> str:
        """The full normalised form: ``name[:tag][@digest]``."""
        out = self.name
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out

    def __str__(self) -> str:
        return self.string()

    def familiar(self) -> str:
        """The short form Docker shows: ``busybox:latest``, ``user/app@sha256:…``."""
        path = self.path
        if self.domain == DEFAULT_DOMAIN:
            rest = path.removeprefix(OFFICIAL_REPO_PREFIX)
            if rest != path and "/" not in rest:
                path = rest
            out = path
        else:
            out = self.name
        if self.tag is not None:
            out += ":" + self.tag
        if self.digest is not None:
            out += "@" + self.digest
        return out

    @property
    def registry_host(self) -> str:
        """The host[:port] to send distribution API requests to."""
        return DOCKER_HUB_API_HOST if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def locator(self) -> str:
        """What goes after ``/manifests/``: the digest if there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        assert self.tag is not None
        return self.tag

    def canonical(self) -> Reference:
        """containerd's ParseDockerRef: a reference with a digest drops its tag."""
        if self.digest is not None and self.tag is not None:
            return Reference(self.domain, self.path, None, self.digest, self.qualified)
        return self

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {tag!r} for image {self.name}")
        return Reference(self.domain, self.path, tag, None, self.qualified)

    def with_digest(self, digest: str) -> Reference:
        """``name@digest`` (no tag): the form recorded in repo_digests."""
        validate_digest(digest)
        return Reference(self.domain, self.path, None, digest, self.qualified)


def validate_digest(digest: str) -> None:
    """Check ``algorithm:hex`` the way go-digest does (registered algorithms, lower hex)."""
    algorithm, sep, encoded = digest.partition(":")
    if not sep:
        raise InvalidArgument(f"invalid digest {digest!r}: missing algorithm")
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidArgument(f"invalid digest {digest!r}: unsupported algorithm {algorithm!r}")
    if len(encoded) != length:
        raise InvalidArgument(
            f"invalid digest {digest!r}: {algorithm} needs {length} hex characters"
        )
    if not re.fullmatch(r"[a-f0-9]+", encoded):
        raise InvalidArgument(f"invalid digest {digest!r}: not lower-case hexadecimal")


def _split_docker_domain(raw: str) -> tuple[str, str, bool]:
    """(domain, remainder, qualified) as distribution's splitDockerDomain does."""
    first, sep, rest = raw.partition("/")
    if not sep:
        return DEFAULT_DOMAIN, OFFICIAL_REPO_PREFIX + raw, False
    if first == "localhost":
        domain, remainder, qualified = first, rest, True
    elif first == LEGACY_DEFAULT_DOMAIN:
        domain, remainder, qualified = DEFAULT_DOMAIN, rest, True
    elif "." in first or ":" in first or first.lower() != first:
        domain, remainder, qualified = first, rest, True
    else:
        domain, remainder, qualified = DEFAULT_DOMAIN, raw, False
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder, qualified


def parse_reference(raw: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalise a user image reference (``busybox``, ``host:5000/a/b:t@sha256:…``).

    Adds ``:latest`` when there is neither tag nor digest (unless ``default_tag``
    is False, in which case ``tag`` may be None with no digest).  Raises
    InvalidArgument naming ``raw`` when it is not a valid reference.
    """
    if not raw:
        raise InvalidArgument('invalid image reference "": repository name must not be empty')
    if _IDENTIFIER_RE.fullmatch(raw):
        raise InvalidArgument(
            f"invalid image reference {raw!r}: a 64-character hexadecimal string is an image id,"
            " not a repository name"
        )
    domain, remainder, qualified = _split_docker_domain(raw)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        raise InvalidArgument(
            f"invalid image reference {raw!r}: repository name {remote!r} must be lowercase"
        )
    full = f"{domain}/{remainder}"
    match = _REFERENCE_RE.fullmatch(full)
    if match is None:
        raise InvalidArgument(f"invalid image reference {raw!r}: {_diagnose(raw)}")
    name, tag, digest = match.group(1), match.group(2), match.group(3)
    if not name.startswith(domain + "/"):  # cannot happen with the grammar; stay safe
        raise InvalidArgument(f"invalid image reference {raw!r}: invalid reference format")
    path = name[len(domain) + 1 :]
    if len(path) > MAX_PATH_LENGTH:
        raise InvalidArgument(
            f"invalid image reference {raw!r}: repository name must not be more than"
            f" {MAX_PATH_LENGTH} characters"
        )
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidArgument(f"invalid image reference {raw!r}: invalid registry {domain!r}")
    if digest is not None:
        try:
            validate_digest(digest)
        except InvalidArgument as exc:
            raise InvalidArgument(f"invalid image reference {raw!r}: {exc.message}") from None
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest, qualified)


def _diagnose(raw: str) -> str:
    """A more useful reason than 'invalid reference format' where one is cheap to find."""
    name = raw.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        tag = last.split(":", 1)[1]
        if len(tag) > 128:
            return "tag must not be longer than 128 characters"
        if not _TAG_RE.fullmatch(tag):
            return f"invalid tag {tag!r}"
    if "://" in raw:
        return "a reference has no URL scheme"
    return "invalid reference format"


def is_domain(value: str) -> bool:
    """Whether ``value`` is a registry ``host[:port]`` by the reference grammar."""
    return _DOMAIN_RE.fullmatch(value) is not None


def parse_image_id(raw: str) -> str | None:
    """``sha256:<hex>`` if ``raw`` is an image id (64 hex, with or without ``sha256:``), else None.

    For ImageStatus/RemoveImage lookups; a name that is not an id returns None
    (it may still be a valid reference).
    """
    encoded = raw.removeprefix("sha256:")
    if _IDENTIFIER_RE.fullmatch(encoded):
        return "sha256:" + encoded
    return None


def split_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a validated digest."""
    validate_digest(digest)
    algorithm, _, encoded = digest.partition(":")
    return algorithm, encoded
