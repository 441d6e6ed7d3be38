"""What each configured OCI runtime handler can do on this host.

Probed once at start (and again when a probe failed): whether the binary runs,
its version, and the features it advertises through `<runtime> features`
(runc >= 1.1, crun >= 1.5). Status reports exactly these facts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field

from cri.config import Config

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


async def _run(*argv: str, timeout: float = 10.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, "", f"{argv[0]} did not answer within {timeout:.0f}s"
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def probe_binary(path: str) -> tuple[bool, str, str]:
    """(runnable, first line of --version, problem)."""
    if not os.access(path, os.X_OK):
        return False, "", f"{path} is missing or not executable"
    try:
        code, out, err = await _run(path, "--version")
    except OSError as exc:
        return False, "", f"{path} cannot run: {exc.strerror}"
    if code != 0:
        return False, "", f"{path} --version failed: {err.strip()[:200]}"
    return True, out.strip().splitlines()[0] if out.strip() else "", ""


class HandlerRegistry:
    """Probed facts about every handler in the config, plus conmon."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.handlers: dict[str, HandlerInfo] = {}
        self.conmon = HandlerInfo(name="conmon", path=cfg.runtime.conmon, root="")
        self._lock = asyncio.Lock()

    async def _probe(self, info: HandlerInfo, features: bool) -> None:
        info.runnable, info.version, info.problem = await probe_binary(info.path)
        info.probed_at = time.monotonic()
        if info.runnable and features:
            code, out, _ = await _run(info.path, "features")
            if code == 0:
                try:
                    info.mount_options = frozenset(json.loads(out).get("mountOptions") or [])
                except ValueError:
                    log.warning("%s features printed invalid JSON", info.path)

    async def refresh(self, force: bool = False) -> None:
        async with self._lock:
            now = time.monotonic()
            for name in self.cfg.runtime.handlers:
                h = self.cfg.handler(name)
                info = self.handlers.get(name)
                if info is None:
                    info = self.handlers[name] = HandlerInfo(name=name, path=h.path, root=h.root)
                if force or not info.probed_at or (
                        not info.runnable and now - info.probed_at > RETRY_AFTER):
                    await self._probe(info, features=True)
            if force or not self.conmon.probed_at or (
                    not self.conmon.runnable and now - self.conmon.probed_at > RETRY_AFTER):
                await self._probe(self.conmon, features=False)

    def default(self) -> HandlerInfo:
        return self.handlers[self.cfg.runtime.default_handler]
