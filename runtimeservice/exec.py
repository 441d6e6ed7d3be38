"""Run a command inside a running container: ExecSync, and the process spec
that interactive exec reuses.

ExecSync runs `<runtime> exec --process <spec> --pid-file <file>` directly,
not through `conmon --exec`: the runtime hands the process our pipes, so the
output arrives as raw bytes (no CRI log file to write, bound and parse back,
which would also blur partial lines), and no monitor process is started. On
this host a bare `runc exec true` takes ~28 ms against ~38 ms for the same
through `conmon --exec`. What conmon adds (surviving a daemon restart) does not
matter for a call whose caller waits for the result. The timeout is ours: the
pid file names the exec'd process, which the runtime makes a session (and
process-group) leader, so one `killpg` ends it and its children; the runtime
process runs in a session of its own and is killed the same way.

Output is kept up to a bound per stream (16 MiB by default); the rest is read
and dropped so the process never blocks on a full pipe, and a note saying how
much was dropped ends the kept output. A non-zero exit is a result, not an
error; a command the runtime could not start at all is an error that carries
the runtime's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from runtimeservice.oci import OciRuntime, read_text
from runtimeservice.ocierrors import runtime_error_message

log = logging.getLogger(__name__)

# How long a killed exec waits for the runtime to name the process it started.
PID_FILE_WAIT = 5.0

DEFAULT_OUTPUT_LIMIT = 16 * 1024 * 1024
# After the command exits, how long to wait for its stdio to reach EOF: a
# background child that kept the pipes open must not hold the call forever.
DRAIN_GRACE = 1.0

# What an exec'd process takes from the container's own process.
_INHERITED = (
    "user", "env", "cwd", "capabilities", "noNewPrivileges", "apparmorProfile",
    "selinuxLabel", "rlimits",
)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False


def exec_process(
    base: Mapping[str, Any],
    args: Sequence[str],
    *,
    tty: bool = False,
    env: Sequence[str] = (),
    cwd: str | None = None,
    console_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """An OCI `process` for an exec: the container's process (user, env,
    capabilities, …) with `args`, `terminal`, and optional extra env/cwd."""
    if not args or not args[0]:
        raise InvalidArgument("exec needs a command (args must not be empty)")
    proc: dict[str, Any] = {k: copy.deepcopy(base[k]) for k in _INHERITED if k in base}
    proc["args"] = list(args)
    proc["terminal"] = tty
    proc.setdefault("user", {"uid": 0, "gid": 0})
    proc.setdefault("cwd", "/")
    if cwd:
        proc["cwd"] = cwd
    if env:
        merged = {e.split("=", 1)[0]: e for e in proc.get("env", [])}
        merged.update({e.split("=", 1)[0]: e for e in env})
        proc["env"] = list(merged.values())
    if tty and console_size:
        proc["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
    return proc


def load_process(bundle: str) -> dict[str, Any]:
    """The `process` object of a bundle's config.json."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            process = json.load(f).get("process")
    except FileNotFoundError:
        raise NotFound(f"container bundle {bundle} has no config.json") from None
    if not isinstance(process, dict):
        raise InvalidArgument(f"{path} has no process object")
    return process


def write_process_file(process: Mapping[str, Any], directory: str) -> str:
    """Write a process spec (mode 0600) for `exec --process`; returns its path."""
    fd, path = tempfile.mkstemp(prefix="process-", suffix=".json", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(process, f)
    return path


class _Capture:
    """Keeps the first `limit` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def value(self) -> bytes:
        data = b"".join(self.chunks)
        if self.dropped:
            data += f"\n[crib: output truncated, {self.dropped} more bytes dropped]\n".encode()
        return data


async def _drain(stream: asyncio.StreamReader | None, capture: _Capture) -> None:
    if stream is None:
        return
    while chunk := await stream.read(65536):
        capture.feed(chunk)


async def exec_sync(
    runtime: OciRuntime,
    container_id: str,
    process: Mapping[str, Any],
    *,
    timeout: float | None = None,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    work_dir: str | None = None,
) -> ExecResult:
    """Run `process` in the container and wait for it (at most `timeout` s,
    None or 0 = no limit). On timeout the process and its process group are
    killed and DeadlineExceeded is raised."""
    work = await asyncio.to_thread(tempfile.mkdtemp, prefix="exec-", dir=work_dir)
    try:
        process_file = await asyncio.to_thread(write_process_file, process, work)
        pid_file = os.path.join(work, "pid")
        log_file = os.path.join(work, "runtime.log")
        argv = [runtime.path, "--log", log_file, *runtime.global_args(),
                *runtime.exec_args(container_id, process_file, pid_file=pid_file)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
            )
        except OSError as e:
            raise FailedPrecondition(
                f"runtime handler {runtime.handler!r}: cannot run {runtime.path}: {e.strerror}"
            ) from e
        out, err = _Capture(output_limit), _Capture(output_limit)
        readers = [asyncio.create_task(_drain(proc.stdout, out)),
                   asyncio.create_task(_drain(proc.stderr, err))]
        try:
            await asyncio.wait_for(proc.wait(), timeout or None)
        except BaseException as e:
            await kill_exec(proc, pid_file)
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if isinstance(e, TimeoutError):
                raise DeadlineExceeded(
                    f"command {list(process.get('args', []))!r} in container {container_id} "
                    f"timed out after {timeout:g}s and was killed"
                ) from None
            raise
        _, pending = await asyncio.wait(readers, timeout=DRAIN_GRACE)
        for r in pending:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        code = proc.returncode or 0
        if code != 0:
            runtime_log = await asyncio.to_thread(read_text, log_file)
            if runtime_error_message(runtime_log):
                # The runtime itself failed: the command never ran.
                raise runtime.error(f"exec in container {container_id}", runtime_log)
        return ExecResult(
            exit_code=code, stdout=out.value(), stderr=err.value(),
            stdout_truncated=out.dropped > 0, stderr_truncated=err.dropped > 0,
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def kill_exec(proc: asyncio.subprocess.Process, pid_file: str) -> None:
    """SIGKILL the exec'd process's session (named by the pid file) and the
    runtime, and reap the runtime."""
    pid = await _exec_pid(proc, pid_file)
    if pid:
        await asyncio.to_thread(_kill_session, pid)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def _exec_pid(proc: asyncio.subprocess.Process, pid_file: str) -> int:
    """The exec'd process's pid. The runtime writes the pid file just after
    starting it (its output may reach the client first): while the runtime
    runs, wait a little for the file, or the process would outlive the kill
    in a session of its own."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PID_FILE_WAIT
    while True:
        pid = await asyncio.to_thread(_read_pid, pid_file)
        if pid or proc.returncode is not None or loop.time() > deadline:
            return pid
        await asyncio.sleep(0.01)


def _kill_session(pid: int) -> None:
    """SIGKILL the exec'd process and everything in its session (the runtime
    makes it a session leader; an interactive shell puts each job in a
    process group of its own)."""
    if pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for member in _session_members(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[3]) == sid:  # state ppid pgrp session ...
            found.append(int(entry))
    return found


def _read_pid(path: str) -> int:
    text = read_text(path).strip()
    return int(text) if text.isdigit() else 0
