"""registries.conf (containers-registries.conf(5), version 2) and pull sources.

What is read: ``unqualified-search-registries``, ``short-name-mode`` (accepted
and validated; crib resolves short names as "permissive" does without a
terminal: the alias if there is one, else every search registry in order),
``[[registry]]`` (``prefix`` incl. ``*.example.com``, ``location``,
``insecure``, ``blocked``, ``mirror-by-digest-only``, ``[[registry.mirror]]``
with ``location``, ``insecure``, ``pull-from-mirror``) and ``[aliases]``.  A
version-1 main file (``[registries.search|insecure|block]``) is converted.

Drop-ins (``<dir>/*.conf``, lexical order, v2 only) merge as containers/image
merges them: a ``[[registry]]`` replaces the one with the same prefix, others
are added; ``unqualified-search-registries`` and ``short-name-mode`` replace
earlier values when present (even an empty list); aliases merge, and an alias
set to "" erases it.

The table for a reference is the one whose prefix is the longest match of the
normalised reference string (a prefix matches when followed by ``/``, ``:``,
``@`` or the end); without a matching table the reference is used as is.
"""

from __future__ import annotations

import ipaddress
import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from cri.errors import FailedPrecondition, InvalidArgument
from imageservice.reference import DEFAULT_DOMAIN, Reference, is_domain, parse_reference

log = logging.getLogger(__name__)


class RegistriesConfigError(InvalidArgument):
    """registries.conf (or a drop-in) is malformed; the message names the file and key."""


class RegistryBlocked(FailedPrecondition):
    """The reference's registry table says ``blocked = true``."""


class PullFromMirror(StrEnum):
    ALL = "all"
    DIGEST_ONLY = "digest-only"
    TAG_ONLY = "tag-only"


class ShortNameMode(StrEnum):
    ENFORCING = "enforcing"
    PERMISSIVE = "permissive"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: PullFromMirror = PullFromMirror.ALL


@dataclass(frozen=True)
class RegistryTable:
    prefix: str
    location: str  # "" only with a "*.example.com" prefix: the reference is used as is
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class PullSource:
    """One place to try: fetch ``reference``; record the image as ``canonical``."""

    reference: Reference  # physical: mirror / rewritten location
    canonical: Reference  # the user's normalised name (or the resolved short name)
    insecure: bool  # TLS verification off and plain HTTP allowed
    mirror: bool = False

    @property
    def host(self) -> str:
        """host[:port] for API requests (docker.io → registry-1.docker.io)."""
        return self.reference.registry_host

    @property
    def repository(self) -> str:
        return self.reference.path

    @property
    def locator(self) -> str:
        """Tag or digest to ask ``/manifests/`` for."""
        return self.reference.locator


def match_prefix(ref: str, prefix: str) -> int:
    """Length of ``ref`` consumed by ``prefix``, or -1 (containers/image's refMatchingPrefix)."""
    if prefix.startswith("*."):
        suffix = prefix[1:]
        index = ref.find(suffix)
        if index == -1 or "/" in ref[:index]:
            return -1
        index += len(suffix)
        if index == len(ref) or ref[index] in ":/@":
            return index
        return -1
    if ref == prefix:
        return len(prefix)
    if ref.startswith(prefix) and len(ref) > len(prefix) and ref[len(prefix)] in ":/@":
        return len(prefix)
    return -1


@dataclass
class RegistriesConfig:
    registries: list[RegistryTable] = field(default_factory=list)
    unqualified_search_registries: list[str] = field(default_factory=list)
    short_name_mode: ShortNameMode = ShortNameMode.PERMISSIVE
    aliases: dict[str, str] = field(default_factory=dict)
    insecure_registries: list[str] = field(default_factory=list)

    def find_registry(self, ref: str) -> RegistryTable | None:
        """The table with the longest prefix matching ``ref`` (a normalised reference string)."""
        best: RegistryTable | None = None
        for table in self.registries:
            if match_prefix(ref, table.prefix) != -1 and (
                best is None or len(table.prefix) > len(best.prefix)
            ):
                best = table
        return best

    def is_insecure(self, location: str) -> bool:
        """Whether crib's own ``insecure_registries`` list covers ``location`` (host[/path])."""
        host = location.split("/", 1)[0]
        for entry in self.insecure_registries:
            entry = entry.removeprefix("https://").removeprefix("http://").rstrip("/")
            if location == entry or location.startswith(entry + "/") or host == entry:
                return True
            if "/" in entry and _host_in_cidr(host, entry):
                return True
        return False

    def candidates(self, raw: str) -> list[PullSource]:
        """The ordered places to pull ``raw`` from (see the module docstring).

        Raises InvalidArgument for a bad reference and RegistryBlocked when every
        candidate is blocked.
        """
        ref = parse_reference(raw)
        names = [ref] if ref.qualified else self._resolve_short_name(raw, ref)
        sources: list[PullSource] = []
        blocked: list[str] = []
        for name in names:
            table = self.find_registry(name.string())
            if table is not None and table.blocked:
                blocked.append(f"{name.name} (prefix {table.prefix!r})")
                continue
            sources.extend(self._sources_for(name, table))
        if not sources:
            raise RegistryBlocked(
                f"pulling {raw!r} is not allowed: registry blocked by registries.conf: "
                + ", ".join(blocked)
            )
        return sources

    def _resolve_short_name(self, raw: str, ref: Reference) -> list[Reference]:
        short = raw.split("@", 1)[0]
        if ":" in short:
            short = short.rsplit(":", 1)[0]
        alias = self.aliases.get(short)
        if alias:
            target = parse_reference(alias, default_tag=False)
            return [Reference(target.domain, target.path, ref.tag, ref.digest)]
        registries = self.unqualified_search_registries or [DEFAULT_DOMAIN]
        out: list[Reference] = []
        for registry in registries:
            resolved = parse_reference(f"{registry}/{short}", default_tag=False)
            out.append(Reference(resolved.domain, resolved.path, ref.tag, ref.digest))
        return out

    def _sources_for(self, ref: Reference, table: RegistryTable | None) -> list[PullSource]:
        if table is None:
            return [PullSource(ref, ref, self.is_insecure(ref.name))]
        digested = ref.digest is not None
        sources: list[PullSource] = []
        for mirror in table.mirrors:
            if table.mirror_by_digest_only and not digested:
                continue
            if mirror.pull_from_mirror is PullFromMirror.DIGEST_ONLY and not digested:
                continue
            if mirror.pull_from_mirror is PullFromMirror.TAG_ONLY and digested:
                continue
            physical = _rewrite(ref, table.prefix, mirror.location)
            insecure = mirror.insecure or self.is_insecure(physical.name)
            sources.append(PullSource(physical, ref, insecure, mirror=True))
        physical = _rewrite(ref, table.prefix, table.location) if table.location else ref
        insecure = table.insecure or self.is_insecure(physical.name)
        sources.append(PullSource(physical, ref, insecure))
        return sources


def _host_in_cidr(host: str, cidr: str) -> bool:
    bare = host[1 : host.find("]")] if host.startswith("[") else host.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(bare)
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False
    return address in network


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    full = ref.string()
    consumed = match_prefix(full, prefix)
    if consumed == -1:  # cannot happen: the table was chosen by this prefix
        raise InvalidArgument(f"registries.conf prefix {prefix!r} does not match {full!r}")
    rewritten = location + full[consumed:]
    try:
        physical = parse_reference(rewritten)
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"registries.conf location {location!r} (prefix {prefix!r}) turns {full!r} into an"
            f" invalid reference: {exc.message}"
        ) from None
    # the tag/digest come from the user's reference, unless the table's prefix
    # named one, in which case the location's replaces it (as containers/image)
    return replace(physical, qualified=True)


# --- loading ------------------------------------------------------------------


@dataclass
class _Parsed:
    """One file's content; None means "key not present" (matters for merging)."""

    registries: list[RegistryTable]
    search: list[str] | None
    mode: ShortNameMode | None
    aliases: dict[str, str]


def load(
    path: Path,
    dropin_dir: Path | None = None,
    insecure_registries: Iterable[str] = (),
) -> RegistriesConfig:
    """Load ``path`` then ``dropin_dir/*.conf``; a missing file or directory is empty."""
    config = RegistriesConfig(insecure_registries=list(insecure_registries))
    main = _load_file(path, allow_v1=True)
    files = [main] if main is not None else []
    if dropin_dir is not None and dropin_dir.is_dir():
        for dropin in sorted(p for p in dropin_dir.iterdir() if p.suffix == ".conf"):
            if dropin.is_file():
                parsed = _load_file(dropin, allow_v1=False)
                if parsed is not None:
                    files.append(parsed)
    tables: dict[str, RegistryTable] = {}
    for parsed in files:
        for table in parsed.registries:
            tables[table.prefix] = table
        if parsed.search is not None:
            config.unqualified_search_registries = list(parsed.search)
        if parsed.mode is not None:
            config.short_name_mode = parsed.mode
        for name, value in parsed.aliases.items():
            if value:
                config.aliases[name] = value
            else:
                config.aliases.pop(name, None)
    config.registries = [tables[prefix] for prefix in sorted(tables)]
    return config


def _load_file(path: Path, allow_v1: bool) -> _Parsed | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistriesConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistriesConfigError(f"{path}: invalid TOML: {exc}") from None
    return _parse(doc, path, allow_v1)


class _Reader:
    """Typed access to a TOML table with errors naming the file and key."""

    def __init__(self, path: Path, table: Mapping[str, Any], where: str) -> None:
        self.path, self.table, self.where = path, table, where

    def error(self, key: str, what: str) -> RegistriesConfigError:
        return RegistriesConfigError(f"{self.path}: {self.where}{key}: {what}")

    def string(self, key: str, default: str = "") -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        return value

    def boolean(self, key: str) -> bool:
        value = self.table.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def strings(self, key: str) -> list[str] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "must be an array of strings")
        return list(value)

    def tables(self, key: str) -> list[Mapping[str, Any]]:
        value = self.table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "must be an array of tables ([[...]])")
        return value


def _location(reader: _Reader, key: str) -> str:
    value = reader.string(key).rstrip("/")
    if value.startswith(("http://", "https://")):
        raise reader.error(key, f"{value!r}: URI schemes are not supported")
    return value


def _parse(doc: Mapping[str, Any], path: Path, allow_v1: bool) -> _Parsed:
    top = _Reader(path, doc, "")
    v1 = doc.get("registries")
    has_v2 = any(k in doc for k in ("registry", "unqualified-search-registries", "aliases"))
    if v1 is not None:
        if not allow_v1:
            raise top.error("registries", "drop-in files must use the version 2 format")
        if has_v2:
            raise top.error("registries", "mixing the version 1 and version 2 formats")
        return _parse_v1(path, v1)
    tables: dict[str, RegistryTable] = {}
    for index, entry in enumerate(top.tables("registry")):
        table = _parse_table(_Reader(path, entry, f"registry[{index}]."))
        tables.setdefault(table.prefix, table)  # within one file the first one wins
    _check_conflicts(path, list(tables.values()))
    search = top.strings("unqualified-search-registries")
    for value in search or []:
        if not is_domain(value):
            raise top.error("unqualified-search-registries", f"{value!r} is not a host[:port]")
    mode_raw = top.string("short-name-mode")
    mode: ShortNameMode | None = None
    if mode_raw:
        try:
            mode = ShortNameMode(mode_raw)
        except ValueError:
            raise top.error(
                "short-name-mode", f"{mode_raw!r} is not enforcing, permissive or disabled"
            ) from None
    aliases = _parse_aliases(path, doc.get("aliases", {}))
    known = {"registry", "unqualified-search-registries", "short-name-mode", "aliases"}
    for key in set(doc) - known:
        log.debug("%s: ignoring unsupported key %r", path, key)
    return _Parsed(list(tables.values()), search, mode, aliases)


def _parse_table(reader: _Reader) -> RegistryTable:
    location = _location(reader, "location")
    prefix = _location(reader, "prefix") or location
    if not prefix:
        raise reader.error("location", "both location and prefix are unset")
    if prefix.startswith("*."):
        if any(c in prefix for c in "/@:"):
            raise reader.error("prefix", f"{prefix!r}: a wildcard prefix must be *.example.com")
    elif not location:
        raise reader.error("location", "unset, and the prefix is not of the form *.example.com")
    if "pull-from-mirror" in reader.table:
        raise reader.error("pull-from-mirror", "only allowed in [[registry.mirror]]")
    by_digest = reader.boolean("mirror-by-digest-only")
    mirrors: list[Mirror] = []
    for index, entry in enumerate(reader.tables("mirror")):
        mreader = _Reader(reader.path, entry, f"{reader.where}mirror[{index}].")
        mlocation = _location(mreader, "location")
        if not mlocation:
            raise mreader.error("location", "a mirror needs a location")
        mode_raw = mreader.string("pull-from-mirror")
        if mode_raw and by_digest:
            raise mreader.error(
                "pull-from-mirror", "cannot be combined with the registry's mirror-by-digest-only"
            )
        try:
            mode = PullFromMirror(mode_raw or "all")
        except ValueError:
            raise mreader.error(
                "pull-from-mirror", f"{mode_raw!r} is not all, digest-only or tag-only"
            ) from None
        mirrors.append(Mirror(mlocation, mreader.boolean("insecure"), mode))
    return RegistryTable(
        prefix=prefix,
        location=location,
        insecure=reader.boolean("insecure"),
        blocked=reader.boolean("blocked"),
        mirror_by_digest_only=by_digest,
        mirrors=tuple(mirrors),
    )


def _check_conflicts(path: Path, tables: list[RegistryTable]) -> None:
    seen: dict[str, RegistryTable] = {}
    for table in tables:
        key = table.location or table.prefix
        other = seen.setdefault(key, table)
        for attr in ("insecure", "blocked"):
            if getattr(other, attr) != getattr(table, attr):
                raise RegistriesConfigError(
                    f"{path}: registry {key!r} is defined several times with conflicting"
                    f" {attr!r} settings"
                )


def _parse_aliases(path: Path, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RegistriesConfigError(f"{path}: aliases: must be a table")
    aliases: dict[str, str] = {}
    for name, target in value.items():
        where = f"{path}: aliases.{name!r}"
        if not isinstance(target, str):
            raise RegistriesConfigError(f"{where}: must be a string")
        try:
            short = parse_reference(name, default_tag=False)
        except InvalidArgument as exc:
            raise RegistriesConfigError(f"{where}: {exc.message}") from None
        if short.qualified or short.tag is not None or short.digest is not None:
            raise RegistriesConfigError(f"{where}: the name must be a short name without tag")
        if target:
            try:
                full = parse_reference(target, default_tag=False)
            except InvalidArgument as exc:
                raise RegistriesConfigError(f"{where}: {exc.message}") from None
            if not full.qualified or full.tag is not None or full.digest is not None:
                raise RegistriesConfigError(
                    f"{where}: {target!r} must be a fully qualified name without tag or digest"
                )
        aliases[name] = target
    return aliases


def _parse_v1(path: Path, v1: Any) -> _Parsed:
    reader = _Reader(path, v1 if isinstance(v1, dict) else {}, "registries.")
    if not isinstance(v1, dict):
        raise reader.error("", "must be a table")

    def section(name: str) -> list[str]:
        sub = reader.table.get(name, {})
        if not isinstance(sub, dict):
            raise reader.error(name, "must be a table")
        return _Reader(path, sub, f"registries.{name}.").strings("registries") or []

    search, insecure, block = section("search"), section("insecure"), section("block")
    tables: dict[str, RegistryTable] = {}
    for location in [*search, *insecure, *block]:
        location = location.rstrip("/")
        tables.setdefault(location, RegistryTable(prefix=location, location=location))
    for location in insecure:
        tables[location.rstrip("/")] = replace(tables[location.rstrip("/")], insecure=True)
    for location in block:
        tables[location.rstrip("/")] = replace(tables[location.rstrip("/")], blocked=True)
    return _Parsed(list(tables.values()), search or None, None, {})
