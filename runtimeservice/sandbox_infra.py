"""The infra process of a pod that shares one PID namespace among its containers.

Only such a pod needs a process of its own: a PID namespace dies with its
init. crib starts Debian's `catatonit -P` (a static binary that only waits and
reaps) through the pod's OCI runtime, as a tiny container that joins the pod's
pinned network, IPC and UTS namespaces and gets a new PID and mount
namespace, in a cgroup below the pod's. No image is involved: the bundle's
rootfs is an empty directory with the binary bind-mounted read-only into it.
Containers of the pod then join ``/proc/<pid>/ns/pid``.

The runtime is the handler's `OciRuntime`: one `run --detach` to start (a
separate create + start would cost a second runtime process), `delete
--force` to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri import tracing
from cri.errors import Internal
from runtimeservice.oci import OciRuntime

log = logging.getLogger(__name__)

INFRA_PATH = "/catatonit"
_STOP_WAIT = 10.0


@dataclass(frozen=True)
class InfraSpec:
    """Where and how to start one sandbox's infra process."""

    sandbox_id: str
    bundle: Path
    binary: str  # on the host, e.g. /usr/bin/catatonit
    cgroups_path: str  # the OCI cgroupsPath (cgroupfs path or systemd slice:prefix:name)
    namespaces: Mapping[str, str]  # OCI namespace type -> path to join ("" = a new one)


@dataclass(frozen=True)
class InfraProcess:
    pid: int
    start_time: int

    @property
    def pidns(self) -> str:
        return f"/proc/{self.pid}/ns/pid"


def bundle_config(spec: InfraSpec) -> dict[str, Any]:
    """The OCI config.json of the infra container (pure)."""
    namespaces = [{"type": "pid"}, {"type": "mount"}]
    for kind in ("network", "ipc", "uts"):
        if kind in spec.namespaces:
            path = spec.namespaces[kind]
            namespaces.append({"type": kind, "path": path} if path else {"type": kind})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [INFRA_PATH, "-P"],
            "env": ["PATH=/"],
            "cwd": "/",
            "capabilities": {"bounding": [], "effective": [], "permitted": []},
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [
            {"destination": INFRA_PATH, "type": "bind", "source": spec.binary,
             "options": ["bind", "ro", "nosuid", "nodev"]},
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "noexec", "mode=755", "size=64k"]},
        ],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": spec.cgroups_path,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }


def _write_bundle(spec: InfraSpec) -> None:
    rootfs = spec.bundle / "rootfs"
    for d in ("dev", "proc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / INFRA_PATH.lstrip("/")).touch()
    (spec.bundle / "config.json").write_text(json.dumps(bundle_config(spec)))


def process_start_time(pid: int) -> int | None:
    """A live (non-zombie) process's start time in clock ticks, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start_time: int) -> bool:
    """Whether the infra process `pid` started at `start_time` still runs."""
    return pid > 0 and process_start_time(pid) == start_time


class InfraRunner:
    """Starts and stops infra processes with one OCI runtime handler."""

    def __init__(self, runtime: OciRuntime) -> None:
        self.runtime = runtime

    async def start(self, spec: InfraSpec) -> InfraProcess:
        """Start the infra process; undo with `stop(spec.sandbox_id, spec.bundle)`."""
        await asyncio.to_thread(_write_bundle, spec)
        pid_file = spec.bundle / "infra.pid"
        with tracing.child_span("runtime.run", **{"runtime.handler": self.runtime.handler}):
            pid = await self.runtime.run_detached(spec.sandbox_id, str(spec.bundle),
                                                  str(pid_file))
        start = process_start_time(pid)
        if start is None:
            raise Internal(f"the infra process of sandbox {spec.sandbox_id} (pid {pid}) "
                           "exited at once")
        log.debug("infra process of %s is pid %d", spec.sandbox_id, pid)
        return InfraProcess(pid, start)

    async def stop(self, sandbox_id: str, bundle: Path, pid: int = 0,
                   start_time: int = 0) -> None:
        """Kill the infra process and delete its runtime state. Idempotent.

        With `pid`/`start_time` known, the kill is a plain SIGKILL and a wait;
        `delete --force` then kills anything left (a process started by a call
        the daemon did not live to record) and removes the runtime's state and
        cgroup. Runs no runtime at all once the state is gone.
        """
        if pid and alive(pid, start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + _STOP_WAIT
            delay = 0.001
            while alive(pid, start_time) and time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
        if Path(self.runtime.root, sandbox_id).exists():
            with tracing.child_span("runtime.delete",
                                    **{"runtime.handler": self.runtime.handler}):
                await self.runtime.delete(sandbox_id, force=True)
        await asyncio.to_thread(shutil.rmtree, bundle, True)
