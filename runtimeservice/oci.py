"""The one OCI runtime interface: a client for runc-compatible CLIs (runc, crun).

An `OciRuntime` is one runtime handler: a name, a binary, a state root
(`--root`) and a cgroup driver. Every method runs the binary once and turns a
failure into a domain error whose message carries the runtime's own words
(`exec: "nosuchcmd": executable file not found in $PATH`), never a bare exit
status; `ocierrors.py` parses those words, the version and the features.

Containers created for the CRI go through conmon (see `monitor.py`): conmon
itself runs `<runtime> create`, so this class hands conmon the global arguments
(`monitor_runtime_args`) instead of creating the container itself. `create`
here is the conmon-less path, for containers that need no log or exit monitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal as signal_mod
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cri.errors import (
    CribError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)
from runtimeservice.cgroups import CgroupDriver
from runtimeservice.ocierrors import (
    CRUN_HYBRID_MARKER,
    RuntimeFeatures,
    RuntimeVersion,
    classify_runtime_error,
    parse_version,
    runtime_error_message,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0

class RuntimeFlavor(enum.Enum):
    """Which CLI dialect the binary speaks; the differences are small."""

    RUNC = "runc"
    CRUN = "crun"


class OciStatus(enum.Enum):
    """Status strings of the OCI runtime spec's `state` operation."""

    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True)
class OciState:
    id: str
    status: OciStatus
    pid: int
    bundle: str
    created: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)


def signal_name(sig: int | str) -> str:
    """`SIGTERM`/`TERM`/15 → `TERM`-style name understood by runc and crun."""
    if isinstance(sig, int):
        try:
            return signal_mod.Signals(sig).name.removeprefix("SIG")
        except ValueError:
            raise InvalidArgument(f"unknown signal number {sig}") from None
    name = sig.strip().upper()
    if name.isdigit():
        return signal_name(int(name))
    name = name.removeprefix("SIG")
    if not hasattr(signal_mod, "SIG" + name):
        raise InvalidArgument(f"unknown signal {sig!r}")
    return name


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: bytes
    stderr: bytes


class OciRuntime:
    """One runtime handler; every method is one invocation of the binary."""

    def __init__(
        self,
        handler: str,
        path: str,
        root: str,
        cgroup_driver: CgroupDriver = CgroupDriver.CGROUPFS,
        *,
        flavor: RuntimeFlavor | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.path = path
        self.root = root
        self.cgroup_driver = cgroup_driver
        self.flavor = flavor or _guess_flavor(path)
        self.timeout = timeout
        self._features: RuntimeFeatures | None = None
        self._features_known = False
        self._version: RuntimeVersion | None = None

    def __repr__(self) -> str:
        return f"OciRuntime({self.handler!r}, {self.path!r}, root={self.root!r})"

    # ---- argument construction (pure) ----

    def global_args(self) -> list[str]:
        """Arguments that go before the sub-command on every call."""
        args = ["--root", self.root, "--log-format", "json"]
        if self.cgroup_driver is CgroupDriver.SYSTEMD:
            args.append("--systemd-cgroup")
        return args

    def monitor_runtime_args(self) -> list[str]:
        """Global arguments for conmon's `--runtime-arg` (conmon adds
        `--systemd-cgroup` itself when given `-s`)."""
        return [f"--root={self.root}", "--log-format=json"]

    def create_args(
        self, container_id: str, bundle: str, pid_file: str, console_socket: str | None = None
    ) -> list[str]:
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        return [*args, container_id]

    def exec_args(
        self,
        container_id: str,
        process_file: str,
        *,
        pid_file: str | None = None,
        detach: bool = False,
        console_socket: str | None = None,
    ) -> list[str]:
        """Argv (after the binary and global args) of `exec --process <file>`."""
        args = ["exec", "--process", process_file]
        if pid_file:
            args += ["--pid-file", pid_file]
        if detach:
            args.append("--detach")
        if console_socket:
            args += ["--console-socket", console_socket]
        return [*args, container_id]

    def kill_args(self, container_id: str, sig: int | str, all_processes: bool) -> list[str]:
        args = ["kill"]
        if all_processes:
            args.append("--all")
        return [*args, container_id, signal_name(sig)]

    def update_args(self, container_id: str, resources_file: str) -> list[str]:
        # runc reads `-` as stdin; crun needs a real file, so both get a file.
        return ["update", "--resources", resources_file, container_id]

    def argv(self, args: Sequence[str]) -> list[str]:
        return [self.path, *self.global_args(), *args]

    # ---- invocation ----

    async def run(
        self,
        args: Sequence[str],
        *,
        stdin: bytes | None = None,
        what: str,
        check: bool = True,
        timeout: float | None = None,
    ) -> RunResult:
        """One invocation of the runtime binary; on timeout or cancellation its whole
        session (the runtime and anything it started) is killed."""
        argv = self.argv(args)
        log.debug("running %s", " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise FailedPrecondition(
                f"runtime handler {self.handler!r}: cannot run {self.path}: {e.strerror}"
            ) from e
        limit = self.timeout if timeout is None else timeout
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), limit)
        except (TimeoutError, asyncio.CancelledError) as e:
            # The runtime runs in a session of its own; end everything it started
            # with it (runc init, or the criu a checkpoint runs).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal_mod.SIGKILL)
            await proc.wait()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise DeadlineExceeded(
                f"{self.handler} {what} did not finish within {limit:g}s"
            ) from None
        result = RunResult(proc.returncode or 0, out, err)
        if check and result.returncode != 0:
            raise self.error(what, err.decode(errors="replace"))
        return result

    def error(self, what: str, *outputs: str) -> CribError:
        """The domain error for a failed invocation, carrying the runtime's message."""
        message = runtime_error_message(*outputs) or "no error message from the runtime"
        cls = classify_runtime_error(message, self.root)
        if CRUN_HYBRID_MARKER in message.lower():
            message += (
                f" ({self.handler} cannot run on this host's hybrid cgroup v1/v2 layout;"
                " use runc, or a host with a pure cgroup v1 or v2 layout)"
            )
        return cls(f"{self.handler} {what} failed: {message}")

    # ---- lifecycle ----

    async def create(
        self,
        container_id: str,
        bundle: str,
        pid_file: str,
        console_socket: str | None = None,
    ) -> int:
        """`create` without a monitor; returns the container's init pid.

        The container inherits the runtime's stdio, so stdio is /dev/null and
        errors are read from a JSON log file, never from a pipe the container
        would hold open.
        """
        fd, log_file = tempfile.mkstemp(prefix=f".{container_id[:12]}-", suffix=".log",
                                        dir=os.path.dirname(pid_file) or None)
        os.close(fd)
        try:
            argv = [self.path, "--log", log_file, *self.global_args(),
                    *self.create_args(container_id, bundle, pid_file, console_socket)]
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                rc = await asyncio.wait_for(proc.wait(), self.timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                await self.delete(container_id, force=True)
                raise DeadlineExceeded(
                    f"{self.handler} create {container_id} did not finish within {self.timeout:g}s"
                ) from None
            if rc != 0:
                text = await asyncio.to_thread(read_text, log_file)
                raise self.error(f"create {container_id}", text)
            return int((await asyncio.to_thread(read_text, pid_file)).strip())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_file)

    async def run_detached(self, container_id: str, bundle: str, pid_file: str) -> int:
        """`run --detach`: create and start in one invocation; returns the init pid.

        For a container that needs no monitor (a sandbox's infra process): one
        runtime process instead of `create` + `start`. As with `create`, stdio
        is /dev/null and errors come from a JSON log file. A failed run leaves
        no container (the runtime destroys it); a timed-out or cancelled one is
        killed and force-deleted.
        """
        fd, log_file = tempfile.mkstemp(prefix=f".{container_id[:12]}-", suffix=".log",
                                        dir=os.path.dirname(pid_file) or None)
        os.close(fd)
        argv = [self.path, "--log", log_file, *self.global_args(), "run", "--detach",
                "--bundle", bundle, "--pid-file", pid_file, container_id]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
            try:
                rc = await asyncio.wait_for(proc.wait(), self.timeout)
            except (TimeoutError, asyncio.CancelledError) as e:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
                await asyncio.shield(self.delete(container_id, force=True))
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise DeadlineExceeded(f"{self.handler} run {container_id} did not finish "
                                       f"within {self.timeout:g}s") from None
            if rc != 0:
                raise self.error(f"run {container_id}",
                                 await asyncio.to_thread(read_text, log_file))
            return int((await asyncio.to_thread(read_text, pid_file)).strip())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_file)

    async def start(self, container_id: str) -> None:
        await self.run(["start", container_id], what=f"start {container_id}")

    async def kill(self, container_id: str, sig: int | str, all: bool = False) -> bool:
        """Send a signal. Returns False when the container has no process to
        signal (already stopped); raises NotFound when it does not exist."""
        res = await self.run(
            self.kill_args(container_id, sig, all), what=f"kill {container_id}", check=False
        )
        if res.returncode == 0:
            return True
        err = self.error(f"kill {container_id}", res.stderr.decode(errors="replace"))
        lowered = err.message.lower()
        if isinstance(err, FailedPrecondition) and (
            "not running" in lowered or "process already finished" in lowered
        ):
            return False
        raise err

    async def delete(self, container_id: str, force: bool = False) -> None:
        """Delete the container; deleting one that does not exist succeeds."""
        args = ["delete", *(["--force"] if force else []), container_id]
        res = await self.run(args, what=f"delete {container_id}", check=False)
        if res.returncode == 0:
            return
        err = self.error(f"delete {container_id}", res.stderr.decode(errors="replace"))
        if isinstance(err, NotFound):
            return
        raise err

    async def state(self, container_id: str) -> OciState:
        res = await self.run(["state", container_id], what=f"state {container_id}")
        try:
            raw = json.loads(res.stdout)
            return OciState(
                id=str(raw.get("id", container_id)),
                status=OciStatus(raw["status"]),
                pid=int(raw.get("pid") or 0),
                bundle=str(raw.get("bundle", "")),
                created=str(raw.get("created", "")),
                annotations=dict(raw.get("annotations") or {}),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise Internal(
                f"{self.handler} state {container_id}: unreadable output {res.stdout[:200]!r}"
            ) from e

    async def pause(self, container_id: str) -> None:
        await self.run(["pause", container_id], what=f"pause {container_id}")

    async def resume(self, container_id: str) -> None:
        await self.run(["resume", container_id], what=f"resume {container_id}")

    async def update(self, container_id: str, resources: Mapping[str, Any] | str) -> None:
        """Apply OCI `linux.resources` (a mapping or its JSON text) to a live container."""
        body = resources if isinstance(resources, str) else json.dumps(resources)
        if self.flavor is RuntimeFlavor.RUNC:
            await self.run(self.update_args(container_id, "-"), stdin=body.encode(),
                            what=f"update {container_id}")
            return
        path = await asyncio.to_thread(_write_temp, body, self.root)
        try:
            await self.run(self.update_args(container_id, path), what=f"update {container_id}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def exec_detached(
        self, container_id: str, process_file: str, pid_file: str
    ) -> int:
        """`exec --detach`: start a process and return its host pid."""
        await self.run(
            self.exec_args(container_id, process_file, pid_file=pid_file, detach=True),
            what=f"exec in {container_id}",
        )
        return int((await asyncio.to_thread(read_text, pid_file)).strip())

    # ---- information ----

    async def features(self) -> RuntimeFeatures | None:
        """`<runtime> features`, cached; None when the runtime has no such command."""
        if not self._features_known:
            res = await self.run(["features"], what="features", check=False)
            if res.returncode == 0:
                try:
                    self._features = RuntimeFeatures.parse(json.loads(res.stdout))
                except (ValueError, AttributeError):
                    log.warning("%s features: unreadable output", self.handler)
            self._features_known = True
        return self._features

    async def version(self) -> RuntimeVersion:
        if self._version is None:
            res = await self.run(["--version"], what="--version")
            self._version = parse_version(res.stdout.decode(errors="replace"), self.flavor.value)
        return self._version


def _guess_flavor(path: str) -> RuntimeFlavor:
    return RuntimeFlavor.CRUN if os.path.basename(path).startswith("crun") else RuntimeFlavor.RUNC


def read_text(path: str) -> str:
    """A small file's text (a pid file, a runtime log); empty when it does not exist (yet)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _write_temp(body: str, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=".update-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    return path
