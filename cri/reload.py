"""SIGHUP: re-read crib's configuration and apply what can change while running.

The daemon keeps where its configuration came from (:class:`ConfigSource`: the
file, the drop-in directory and the command-line overrides, which still win)
and on SIGHUP:

1. loads and validates it again, off the event loop; a ConfigError is logged
   and the running configuration stays as it is, whole;
2. diffs it against the running configuration, key by dotted key (pure:
   :func:`diff`);
3. applies the live sections:
   - ``log_level`` (``cri.logs.setup``),
   - ``[tracing]`` (``cri.tracing.setup``: the exporter is replaced; if the new
     one cannot be built the old one is put back),
   - ``[image]`` (``ImageService.reload``, which also re-reads registries.conf,
     its drop-ins and the auth file even when no key changed; a table whose
     files cannot be read is refused whole);
4. logs one line per applied key (``reload: image.auth_file: '' -> '/x.json'``)
   and one warning naming the changed keys that need a restart.

The running :class:`~cri.config.Config` is shared by the services; applied
keys are written into it in place, so ``Status(verbose)`` shows what is in
force.  Keys that need a restart keep their old values there, which is why a
later SIGHUP warns about them again until the daemon is restarted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cri import logs, tracing
from cri.config import Config, ConfigError, ImageConfig, load

log = logging.getLogger(__name__)

# First components of the dotted keys that can change without a restart.
LIVE_SECTIONS = frozenset({"log_level", "tracing", "image"})


class _Unset:
    """A key that exists on one side of a diff only (an added or removed handler)."""

    def __repr__(self) -> str:
        return "(unset)"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class ConfigSource:
    """Where the daemon's configuration comes from, to read it again on SIGHUP."""

    config_file: Path | None = None
    dropin_dir: Path | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        """The configuration as these sources give it now; raises ConfigError."""
        return load(self.config_file, self.dropin_dir, dict(self.overrides))


@dataclass(frozen=True)
class Change:
    """One dotted key whose value differs between two configurations."""

    key: str
    old: Any
    new: Any

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def live(self) -> bool:
        """Whether it can be applied without a restart."""
        return self.section in LIVE_SECTIONS

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config dataclass by dotted key (``runtime.handlers.runc.path``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        elif isinstance(value, dict):
            for name, item in value.items():
                if dataclasses.is_dataclass(item):
                    out.update(flatten(item, f"{key}.{name}."))
                else:
                    out[f"{key}.{name}"] = item
        else:
            out[key] = value
    return out


def diff(old: Config, new: Config) -> list[Change]:
    """What changed from ``old`` to ``new``, sorted by key."""
    before, after = flatten(old), flatten(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key, UNSET), after.get(key, UNSET)
        if a is UNSET or b is UNSET or a != b:
            changes.append(Change(key, a, b))
    return changes


class ImageReloader(Protocol):
    """What the reloader needs from the image service."""

    async def reload(self, image: ImageConfig | None = None) -> bool: ...


def _copy_into(target: Any, source: Any) -> None:
    for f in dataclasses.fields(source):
        setattr(target, f.name, getattr(source, f.name))


def _more_verbose(new: str, old: str) -> bool:
    return logging.getLevelName(new.upper()) < logging.getLevelName(old.upper())


class Reloader:
    """Applies a re-read configuration to the running daemon; one reload at a time."""

    def __init__(self, running: Config, source: ConfigSource | None,
                 images: ImageReloader) -> None:
        self.running = running
        self.source = source
        self.images = images
        self._lock = asyncio.Lock()

    async def reload(self) -> list[Change]:
        """Re-read, diff, apply; returns the changes applied (see the module docstring)."""
        async with self._lock:
            if self.source is None:  # nothing to re-read: only the image files
                await self.images.reload()
                return []
            try:
                new = await asyncio.to_thread(self.source.load)
            except ConfigError as exc:
                log.error("reload: configuration error, keeping the running configuration: %s",
                          exc)
                return []
            return await self._apply(new)

    async def _apply(self, new: Config) -> list[Change]:
        changes = diff(self.running, new)
        by_section: dict[str, list[Change]] = {}
        for change in changes:
            by_section.setdefault(change.section, []).append(change)
        applied: list[Change] = []
        # Switch to a more verbose level first and to a quieter one last, so that the
        # lines below are logged under whichever of the two levels shows more.
        level_changes = by_section.get("log_level", [])
        verbose_first = _more_verbose(new.log_level, self.running.log_level)
        if level_changes and verbose_first:
            applied += self._apply_log_level(new, level_changes)
        if by_section.get("tracing"):
            applied += await self._apply_tracing(new, by_section["tracing"])
        applied += await self._apply_image(new, by_section.get("image", []))
        if level_changes and not verbose_first:
            applied += self._apply_log_level(new, level_changes)
        restart = [c for c in changes if not c.live]
        if restart:
            log.warning("reload: changed but needs a restart to take effect (still running "
                        "with the old values): %s", "; ".join(str(c) for c in restart))
        log.info("reload: done, %d change(s) applied, %d need a restart", len(applied),
                 len(restart))
        return applied

    def _apply_log_level(self, new: Config, changes: list[Change]) -> list[Change]:
        for change in changes:
            log.info("reload: %s", change)
        logs.setup(new.log_level)
        self.running.log_level = new.log_level
        return changes

    async def _apply_tracing(self, new: Config, changes: list[Change]) -> list[Change]:
        try:
            await asyncio.to_thread(tracing.setup, new.tracing)
        except Exception as exc:  # any exporter failure: put the old one back
            log.error("reload: [tracing] not changed (%s): %s",
                      ", ".join(c.key for c in changes), exc)
            try:
                await asyncio.to_thread(tracing.setup, self.running.tracing)
            except Exception as again:
                log.error("reload: the previous tracing exporter cannot be restored either: "
                          "%s", again)
            return []
        _copy_into(self.running.tracing, new.tracing)
        for change in changes:
            log.info("reload: %s", change)
        return changes

    async def _apply_image(self, new: Config, changes: list[Change]) -> list[Change]:
        # Called even with no [image] change: registries.conf or the auth file may have.
        if not await self.images.reload(new.image):
            if changes:
                log.error("reload: [image] not changed (%s): see the error above",
                          ", ".join(c.key for c in changes))
            return []
        _copy_into(self.running.image, new.image)
        for change in changes:
            log.info("reload: %s", change)
        return changes
