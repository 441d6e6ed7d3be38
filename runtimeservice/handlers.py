"""What each configured OCI runtime handler can do on this host.

Every handler in the config gets one `OciRuntime` (its binary, state root and
the daemon's cgroup driver), probed once at start and again when a probe
failed: whether the binary runs, its version (`OciRuntime.version()`), and
the features it advertises (`OciRuntime.features()`, runc >= 1.1; crun 1.8
has no `features` command and so advertises none). Status reports exactly
these facts; container code takes its runtimes from here (`runtime(name)`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from dataclasses import dataclass, field

from cri.config import Config
from cri.errors import CribError
from runtimeservice.cgroups import CgroupDriver
from runtimeservice.oci import OciRuntime, RuntimeFlavor
from runtimeservice.ocierrors import crun_unsupported_reason

log = logging.getLogger(__name__)
RETRY_AFTER = 30.0


@dataclass
class HandlerInfo:
    name: str
    path: str
    root: str
    runnable: bool = False
    version: str = ""
    problem: str = ""
    mount_options: frozenset[str] = field(default_factory=frozenset)
    probed_at: float = 0.0
    # Why the binary runs but cannot run containers here (crun on a hybrid
    # cgroup host); "" when nothing is known against it.
    host_problem: str = ""

    @property
    def recursive_read_only_mounts(self) -> bool:
        return "rro" in self.mount_options and kernel_supports_rro()


def kernel_supports_rro() -> bool:
    """mount_setattr(2) with AT_RECURSIVE arrived in Linux 5.12."""
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 12)


async def probe_binary(path: str, timeout: float = 10.0) -> tuple[bool, str, str]:
    """(runnable, first line of --version, problem), for a binary that is not
    an OCI runtime (conmon)."""
    if not os.access(path, os.X_OK):
        return False, "", f"{path} is missing or not executable"
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--version", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        return False, "", f"{path} cannot run: {exc.strerror}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, "", f"{path} did not answer within {timeout:.0f}s"
    if proc.returncode != 0:
        return False, "", f"{path} --version failed: {err.decode(errors='replace').strip()[:200]}"
    text = out.decode(errors="replace").strip()
    return True, text.splitlines()[0] if text else "", ""


class HandlerRegistry:
    """Probed facts about every handler in the config, plus conmon."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.handlers: dict[str, HandlerInfo] = {}
        self.runtimes: dict[str, OciRuntime] = {}
        self.conmon = HandlerInfo(name="conmon", path=cfg.runtime.conmon, root="")
        self._lock = asyncio.Lock()
        driver = CgroupDriver(cfg.runtime.cgroup_driver)
        for name in cfg.runtime.handlers:
            h = cfg.handler(name)
            self.runtimes[name] = OciRuntime(name, h.path, h.root, driver)

    def runtime(self, name: str) -> OciRuntime:
        """The OciRuntime of handler `name` ('' = the default handler)."""
        return self.runtimes[name or self.cfg.runtime.default_handler]

    async def _probe_runtime(self, info: HandlerInfo, runtime: OciRuntime) -> None:
        info.probed_at = time.monotonic()
        if not os.access(info.path, os.X_OK):
            info.runnable, info.problem = False, f"{info.path} is missing or not executable"
            return
        try:
            version = await runtime.version()
            features = await runtime.features()
        except CribError as exc:
            info.runnable, info.problem = False, exc.message
            return
        info.runnable, info.problem = True, ""
        info.version = f"{version.name} version {version.version}"
        info.mount_options = features.mount_options if features is not None else frozenset()
        if runtime.flavor is RuntimeFlavor.CRUN:
            info.host_problem = crun_unsupported_reason() or ""

    async def _probe_conmon(self) -> None:
        info = self.conmon
        info.runnable, info.version, info.problem = await probe_binary(info.path)
        info.probed_at = time.monotonic()

    @staticmethod
    def _due(info: HandlerInfo, force: bool, now: float) -> bool:
        return force or not info.probed_at or (
            not info.runnable and now - info.probed_at > RETRY_AFTER)

    async def refresh(self, force: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            for name, runtime in self.runtimes.items():
                info = self.handlers.get(name)
                if info is None:
                    info = self.handlers[name] = HandlerInfo(
                        name=name, path=runtime.path, root=runtime.root)
                if self._due(info, force, now):
                    await self._probe_runtime(info, runtime)
            if self._due(self.conmon, force, now):
                await self._probe_conmon()

    def default(self) -> HandlerInfo:
        return self.handlers[self.cfg.runtime.default_handler]
