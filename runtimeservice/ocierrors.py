"""What an OCI runtime says about itself and its failures, parsed.

- `runtime_error_message`: the runtime's own words from its stderr and/or its
  JSON log. With `--log-format json` and no `--log`, runc and crun print JSON
  lines (`{"level": "error", "msg": ...}`) on stderr; with a `--log` file they
  write the JSON there and runc prints the bare message on stderr; older
  builds print logrus text. All three shapes are understood.
- `classify_runtime_error`: which domain error that message is.
- `parse_version` (`<runtime> --version`) and `RuntimeFeatures.parse`
  (`<runtime> features`).
- `crun_unsupported_reason`: why crun (<= 1.8) cannot run on this host.

Pure logic, apart from the one small file `crun_unsupported_reason` reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cri.errors import (
    AlreadyExists,
    CribError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)

# crun refuses hosts where cgroup v1 controllers sit beside a cgroup2 mount that
# has controllers of its own ("hybrid" layout).
CRUN_HYBRID_MARKER = "cgroups in hybrid mode not supported"


@dataclass(frozen=True)
class RuntimeVersion:
    name: str
    version: str
    commit: str = ""
    spec: str = ""


@dataclass(frozen=True)
class RuntimeFeatures:
    """What `<runtime> features` says; absent when the runtime has no such command."""

    mount_options: frozenset[str]
    namespaces: frozenset[str]
    cgroup_v1: bool
    cgroup_v2: bool
    seccomp: bool
    idmap_mounts: bool
    raw: Mapping[str, Any]

    @property
    def recursive_read_only(self) -> bool:
        """The runtime understands `rro` (the kernel must also have mount_setattr)."""
        return "rro" in self.mount_options

    @property
    def user_namespaces(self) -> bool:
        """User namespaces with id-mapped mounts, as the CRI feature means it."""
        return "user" in self.namespaces and self.idmap_mounts

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> RuntimeFeatures:
        linux = raw.get("linux") or {}
        cgroup = linux.get("cgroup") or {}
        idmap = ((linux.get("mountExtensions") or {}).get("idmap") or {}).get("enabled")
        return cls(
            mount_options=frozenset(raw.get("mountOptions") or ()),
            namespaces=frozenset(linux.get("namespaces") or ()),
            cgroup_v1=bool(cgroup.get("v1")),
            cgroup_v2=bool(cgroup.get("v2")),
            seccomp=bool((linux.get("seccomp") or {}).get("enabled")),
            idmap_mounts=bool(idmap),
            raw=raw,
        )


_LOGRUS_MSG = re.compile(r'(?:^|\s)msg="((?:[^"\\]|\\.)*)"')
_LOGRUS_LEVEL = re.compile(r"(?:^|\s)level=(\w+)")


def runtime_error_message(*outputs: str) -> str:
    """Extract the runtime's error text from its stderr and/or JSON log.

    Error/fatal JSON or logrus entries win; otherwise the last non-empty plain
    line. Returns "" when there is nothing to say.
    """
    errors: list[str] = []
    plain: list[str] = []
    for text in outputs:
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    plain.append(line)
                    continue
                if isinstance(entry, dict):
                    if str(entry.get("level", "error")) in ("error", "fatal", "panic"):
                        errors.append(str(entry.get("msg", "")).strip())
                    continue
            match = _LOGRUS_MSG.search(line)
            if match and line.startswith("time="):
                level = _LOGRUS_LEVEL.search(line)
                if level is None or level.group(1) in ("error", "fatal", "panic"):
                    errors.append(_unescape_logrus(match.group(1)).strip())
                continue
            plain.append(line)
    candidates = [e for e in errors if e] or plain
    # De-duplicate while keeping order (runc may say the same thing twice).
    seen: list[str] = []
    for c in candidates:
        if c not in seen:
            seen.append(c)
    return "; ".join(seen[-2:])


def _unescape_logrus(value: str) -> str:
    try:
        return str(json.loads(f'"{value}"'))
    except ValueError:
        return value


def classify_runtime_error(message: str, state_root: str = "") -> type[CribError]:
    """Map a runtime's error text to the domain error that describes it best.

    "Missing" is NotFound only when it is the container that is missing (runc:
    "container does not exist"; crun: a missing file under its state root), not
    a missing bundle file or executable.
    """
    lowered = message.lower()
    if "container does not exist" in lowered:
        return NotFound
    if state_root and "no such file or directory" in lowered and state_root in message:
        return NotFound
    if "already exists" in lowered:
        return AlreadyExists
    if "executable file not found" in lowered or (
        'exec: "' in lowered and ("no such file" in lowered or "permission denied" in lowered)
    ):
        return InvalidArgument  # the command asked for cannot be run
    if CRUN_HYBRID_MARKER in lowered:
        return FailedPrecondition
    precondition = (
        "not running",
        "process already finished",
        "not stopped",
        "already running",
        "cannot start",
        "cannot exec",
        "cannot delete",
        "is paused",
        "not paused",
        "container has stopped",
    )
    if any(p in lowered for p in precondition):
        return FailedPrecondition
    if "json: cannot unmarshal" in lowered or "invalid argument" in lowered:
        return InvalidArgument
    return Internal


def parse_version(text: str, default_name: str) -> RuntimeVersion:
    """Parse `runc --version` / `crun --version` output."""
    name, version, commit, spec = default_name, "", "", ""
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(\S+) version (\S+)", line)
        if m and not version:
            name, version = m.group(1), m.group(2)
        elif line.startswith("commit:"):
            commit = line.split(":", 1)[1].strip()
        elif line.startswith("spec:"):
            spec = line.split(":", 1)[1].strip()
    return RuntimeVersion(name=name, version=version or "unknown", commit=commit, spec=spec)


def crun_unsupported_reason(cgroup_root: str = "/sys/fs/cgroup") -> str | None:
    """Why crun (≤1.8) cannot run here, or None: it refuses hybrid hosts whose
    cgroup2 mount has controllers while v1 controllers are mounted too."""
    unified = os.path.join(cgroup_root, "unified", "cgroup.controllers")
    try:
        with open(unified) as f:
            controllers = f.read().split()
    except OSError:
        return None
    if controllers:
        return (
            f"crun refuses this hybrid cgroup host: {CRUN_HYBRID_MARKER} "
            f"(cgroup2 at {os.path.dirname(unified)} has controllers {' '.join(controllers)})"
        )
    return None
