"""conmon, the per-container monitor: start it, talk to it, learn how it ended.

Start-up protocol (conmon 2.1, `_OCI_STARTPIPE` / `_OCI_SYNCPIPE`): we spawn
conmon with two inherited pipe fds named in those variables. conmon blocks on
the start pipe until we write to it, which gives us the moment to move it into
its cgroup; it then double-forks (the process we spawned exits at once, the
monitor is re-parented to init and calls setsid, so it outlives the daemon and
never shares its process group), runs `<runtime> create`, and writes one JSON
line on the sync pipe: `{"data": <container pid>}` (`"pid"` without
`--api-version`), or `{"data": -1, "message": "<runtime stderr>"}` when create
failed.

Files conmon leaves (what this module reads):
- `<exit_dir>/<container id>`, `<persist_dir>/exit` and `<persist_dir>/oom`:
  how the container ended (see `exitwatch.py`, the one exit mechanism;
  `Monitor.read_exit` reads them for one container).
- `<bundle>/ctl`: a FIFO taking `<type> <height> <width>\\n` lines; type 1 is a
  window resize, type 2 makes conmon reopen (truncate-and-rename) its log file.
- `<socket_dir>/<container id>` → `<bundle>` symlink and, inside, the `attach`
  SOCK_SEQPACKET socket: conmon prefixes every chunk it sends with one byte
  naming the pipe (`ATTACH_PIPE_STDOUT` 2, `ATTACH_PIPE_STDERR` 3); what a
  client sends goes to the container's stdin.
  The symlink keeps the socket path under the 108-byte limit, so `socket_dir`
  must be short (≤ ~30 bytes with 64-hex ids).

Not used: `--sync` (conmon would stay our child and die or linger as a zombie
with the daemon), `--full-attach` (the socket in the bundle dir could exceed
the 108-byte limit), `--syslog` (conmon's own messages are not needed: create
errors come back on the sync pipe).

cgroup placement: conmon goes into ONE shared cgroup (`MonitorConfig.
conmon_cgroup`, default `/crib-conmon`, in every hierarchy, joined through
`cgroups.CgroupManager.add_pid`), not into
the pod's: a pod hitting its memory limit or being frozen must not take its
monitor with it, and a shared cgroup needs no per-container cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cri.errors import DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument
from runtimeservice.cgroups import CgroupDriver, CgroupManager, detect
from runtimeservice.exitwatch import ExitInfo, read_exit_file
from runtimeservice.oci import OciRuntime, read_text

log = logging.getLogger(__name__)

CONMON_PATH = "/usr/bin/conmon"
CTL_RESIZE = 1
# First byte of every message conmon sends on the attach socket.
ATTACH_PIPE_STDOUT = 2
ATTACH_PIPE_STDERR = 3
CTL_REOPEN_LOGS = 2
# What CRI-O reports when the monitor vanished without leaving an exit code.

@dataclass(frozen=True)
class MonitorConfig:
    conmon_path: str = CONMON_PATH
    exit_dir: str = "/run/crib/exits"
    socket_dir: str = "/run/crib/s"
    conmon_cgroup: str | None = "/crib-conmon"
    log_size_max: int = 0  # bytes; 0 = unlimited
    create_timeout: float = 120.0
    reopen_timeout: float = 5.0
    cgroup_root: str = "/sys/fs/cgroup"


@dataclass(frozen=True)
class MonitorSpec:
    """One container to start under conmon. `persist_dir` belongs to the container
    (pid files, `exit`, `oom` land there; it is conmon's working directory)."""

    container_id: str
    bundle: str
    persist_dir: str
    log_path: str
    name: str = ""
    stdin: bool = False
    stdin_once: bool = False
    terminal: bool = False

    @property
    def pid_file(self) -> str:
        return os.path.join(self.persist_dir, "pid")

    @property
    def conmon_pid_file(self) -> str:
        return os.path.join(self.persist_dir, "conmon.pid")


@dataclass(frozen=True)
class MonitoredContainer:
    container_id: str
    pid: int
    conmon_pid: int


class Monitor:
    """Starts conmon for containers of any runtime handler and talks to it."""

    def __init__(self, config: MonitorConfig, cgroups: CgroupManager | None = None) -> None:
        self.config = config
        self._cgroups = cgroups
        self._cgroup_lock = asyncio.Lock()  # joining vs. removing the shared conmon cgroup

    @property
    def cgroups(self) -> CgroupManager:
        """Where conmon's cgroup is made (the host's layout unless one was given)."""
        if self._cgroups is None:
            self._cgroups = CgroupManager(detect(Path(self.config.cgroup_root)))
        return self._cgroups

    # ---- paths ----

    def exit_file(self, container_id: str) -> str:
        return os.path.join(self.config.exit_dir, container_id)

    def attach_socket_path(self, container_id: str) -> str:
        return os.path.join(self.config.socket_dir, container_id, "attach")

    def ctl_path(self, container_id: str) -> str:
        return os.path.join(self.config.socket_dir, container_id, "ctl")

    # ---- start ----

    def conmon_argv(self, runtime: OciRuntime, spec: MonitorSpec) -> list[str]:
        if ":" in spec.log_path:
            raise InvalidArgument(
                f"log path {spec.log_path!r} contains ':', which conmon cannot accept"
            )
        cid = spec.container_id
        argv = [
            self.config.conmon_path, "--api-version",
            "-c", cid, "-u", cid, "-n", spec.name or cid,
            "-r", runtime.path,
            "-b", spec.bundle,
            "-p", spec.pid_file, "-P", spec.conmon_pid_file,
            "-l", f"k8s-file:{spec.log_path}",
            "--exit-dir", self.config.exit_dir,
            "-0", spec.persist_dir,
            "--socket-dir-path", self.config.socket_dir,
        ]
        for arg in runtime.monitor_runtime_args():
            argv += ["--runtime-arg", arg]
        if runtime.cgroup_driver is CgroupDriver.SYSTEMD:
            argv.append("--systemd-cgroup")
        if self.config.log_size_max > 0:
            argv += ["--log-size-max", str(self.config.log_size_max)]
        if spec.stdin:
            argv.append("--stdin")
            if not spec.stdin_once:
                argv.append("--leave-stdin-open")
        if spec.terminal:
            argv.append("--terminal")
        return argv

    async def create(self, runtime: OciRuntime, spec: MonitorSpec) -> MonitoredContainer:
        """Start conmon, which runs `<runtime> create`; return the container pid.

        On any failure nothing is left: no runtime state, no conmon, no files
        of ours; the error carries the runtime's message.
        """
        argv = self.conmon_argv(runtime, spec)
        await asyncio.to_thread(self._prepare, spec)
        start_r, start_w = os.pipe()
        sync_r, sync_w = os.pipe()
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"),
            "_OCI_STARTPIPE": str(start_r),
            "_OCI_SYNCPIPE": str(sync_w),
        }
        proc: asyncio.subprocess.Process | None = None
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, env=env, cwd=spec.persist_dir, pass_fds=(start_r, sync_w),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, start_new_session=True,
                )
            except OSError as e:
                raise FailedPrecondition(
                    f"cannot run conmon at {self.config.conmon_path}: {e.strerror}"
                ) from e
            finally:
                os.close(start_r)
                os.close(sync_w)
            if self.config.conmon_cgroup:
                async with self._cgroup_lock:
                    await self.cgroups.add_pid(self.config.conmon_cgroup, proc.pid)
            os.write(start_w, b"0")  # conmon may now fork and run the runtime
            os.close(start_w)
            start_w = -1
            sync_file = os.fdopen(sync_r, "rb", buffering=0)
            sync_r = -1
            line = await self._read_sync(sync_file, spec)
            await proc.wait()
            return await self._started(runtime, spec, proc, line)
        except BaseException:
            if start_w >= 0 and proc is not None and proc.returncode is None:
                # Closing the start pipe would let conmon go on: kill it first.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await asyncio.shield(self._abort(runtime, spec, proc))
            raise
        finally:
            for fd in (start_w, sync_r):
                if fd >= 0:
                    os.close(fd)

    async def _read_sync(self, sync_file: BinaryIO, spec: MonitorSpec) -> bytes:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), sync_file
            )
        except BaseException:
            sync_file.close()
            raise
        try:
            return await asyncio.wait_for(reader.readline(), self.config.create_timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"creating container {spec.container_id} under conmon did not finish within "
                f"{self.config.create_timeout:g}s"
            ) from None
        finally:
            transport.close()

    async def _started(
        self,
        runtime: OciRuntime,
        spec: MonitorSpec,
        proc: asyncio.subprocess.Process,
        line: bytes,
    ) -> MonitoredContainer:
        cid = spec.container_id
        if not line.strip():
            stderr = b""
            if proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    stderr = await asyncio.wait_for(proc.stderr.read(), 2.0)
            detail = stderr.decode(errors="replace").strip() or "no message"
            raise Internal(
                f"conmon for container {cid} exited (status {proc.returncode}) without "
                f"reporting a pid: {detail}"
            )
        try:
            reply = json.loads(line)
            value = int(reply["data"] if "data" in reply else reply["pid"])
        except (ValueError, KeyError, TypeError):
            raise Internal(
                f"conmon for container {cid} sent an unreadable reply {line!r}"
            ) from None
        if value < 0:
            raise runtime.error(f"create {cid}", str(reply.get("message", "")))
        conmon_pid = int((await asyncio.to_thread(read_text, spec.conmon_pid_file)).strip() or 0)
        log.info("container %s created under conmon %d (pid %d)", cid, conmon_pid, value)
        return MonitoredContainer(container_id=cid, pid=value, conmon_pid=conmon_pid)

    async def _abort(
        self, runtime: OciRuntime, spec: MonitorSpec, proc: asyncio.subprocess.Process | None
    ) -> None:
        """Undo a failed create: stop conmon, delete the runtime's state, drop files."""
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        conmon_pid = int((await asyncio.to_thread(read_text, spec.conmon_pid_file)).strip() or 0)
        if conmon_pid and monitor_alive(conmon_pid, spec.container_id):
            # A conmon that reported failure exits by itself; give it a moment.
            for _ in range(50):
                if not monitor_alive(conmon_pid, spec.container_id):
                    break
                await asyncio.sleep(0.02)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(conmon_pid, signal.SIGKILL)
        try:
            await runtime.delete(spec.container_id, force=True)
        except Exception:  # the original error matters more
            log.exception("cleanup: deleting container %s failed", spec.container_id)
        await self.cleanup(spec.container_id, spec.bundle, spec.persist_dir)

    def _prepare(self, spec: MonitorSpec) -> None:
        for d in (self.config.exit_dir, self.config.socket_dir, spec.persist_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(spec.log_path) or ".", exist_ok=True)
        _unlink_all([
            self.exit_file(spec.container_id), spec.pid_file, spec.conmon_pid_file,
            os.path.join(spec.persist_dir, "exit"), os.path.join(spec.persist_dir, "oom"),
        ])

    async def release_cgroup(self) -> bool:
        """Remove the shared conmon cgroup if no monitor is left in it (so an idle
        daemon leaves no cgroup behind); True when it is gone."""
        path = self.config.conmon_cgroup
        if not path:
            return True
        async with self._cgroup_lock:
            if await self.cgroups.pids(path):
                return False
            try:
                await self.cgroups.remove(path)
            except FailedPrecondition:  # a monitor arrived from outside our lock
                return False
        return True

    async def cleanup(self, container_id: str, bundle: str, persist_dir: str) -> None:
        """Remove what conmon left for a container (call after the runtime delete)."""
        paths = [
            self.exit_file(container_id),
            os.path.join(self.config.socket_dir, container_id),
            *(os.path.join(bundle, n) for n in ("ctl", "winsz", "attach")),
            *(os.path.join(persist_dir, n) for n in ("pid", "conmon.pid", "exit", "oom")),
        ]
        await asyncio.to_thread(_unlink_all, paths)

    # ---- control ----

    async def reopen_log(self, container_id: str, log_path: str, conmon_pid: int = 0) -> None:
        """Make conmon reopen `log_path` (after it was renamed away), and wait
        until the new file is there. With `conmon_pid`, a monitor that dies
        meanwhile ends the wait at once (FailedPrecondition)."""
        await asyncio.to_thread(
            self._reopen_blocking, container_id, log_path, self.config.reopen_timeout,
            conmon_pid,
        )

    def _reopen_blocking(
        self, container_id: str, log_path: str, timeout: float, conmon_pid: int
    ) -> None:
        before = _file_key(log_path)
        exited = self.exit_file(container_id)
        stopped = FailedPrecondition(
            f"container {container_id} is not running: its log is no longer written"
        )
        if os.path.exists(exited):
            raise stopped
        self._write_ctl(container_id, f"{CTL_REOPEN_LOGS} 0 0\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = _file_key(log_path)
            if now is not None and now != before:
                return
            if os.path.exists(exited):  # conmon exits without reading the FIFO
                raise stopped
            # A killed multi-threaded conmon may hold the FIFO open a moment
            # after its main thread is gone: the write lands, nobody reads it.
            if conmon_pid and not monitor_alive(conmon_pid, container_id):
                raise FailedPrecondition(
                    f"the monitor of container {container_id} is not running"
                )
            time.sleep(0.005)
        raise DeadlineExceeded(
            f"conmon did not reopen the log {log_path} of container {container_id} "
            f"within {timeout:g}s"
        )

    async def resize(self, container_id: str, height: int, width: int) -> None:
        """Resize the container's terminal (only meaningful with `terminal=True`)."""
        if not (0 <= height <= 0xFFFF and 0 <= width <= 0xFFFF):
            raise InvalidArgument(f"invalid terminal size {height}x{width}")
        await asyncio.to_thread(self._write_ctl, container_id, f"{CTL_RESIZE} {height} {width}\n")

    def _write_ctl(self, container_id: str, message: str) -> None:
        path = self.ctl_path(container_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"container {container_id} has no conmon control FIFO at {path}"
            ) from None
        except OSError as e:  # ENXIO: nobody reads the FIFO, conmon is gone
            raise FailedPrecondition(
                f"the monitor of container {container_id} is not running ({e.strerror})"
            ) from None
        try:
            os.write(fd, message.encode())
        finally:
            os.close(fd)

    # ---- exits ----

    def read_exit(self, container_id: str, persist_dir: str | None = None) -> ExitInfo | None:
        """The recorded exit of a container, or None while it has not exited."""
        path = self.exit_file(container_id)
        info = read_exit_file(path)
        if info is None and persist_dir:
            info = read_exit_file(os.path.join(persist_dir, "exit"))
        if info is None:
            return None
        if persist_dir and os.path.exists(os.path.join(persist_dir, "oom")):
            info = ExitInfo(info.exit_code, info.finished_at_ns, oom_killed=True)
        return info


def monitor_alive(conmon_pid: int, container_id: str | None = None) -> bool:
    """True while `conmon_pid` is a live (not zombie) conmon, for `container_id`
    when given (guards against pid reuse)."""
    if conmon_pid <= 0:
        return False
    try:
        with open(f"/proc/{conmon_pid}/stat", "rb") as f:
            stat = f.read()
        comm_end = stat.rindex(b")")
        comm = stat[stat.index(b"(") + 1 : comm_end]
        state = stat[comm_end + 2 : comm_end + 3]
        if comm != b"conmon" or state in (b"Z", b"X"):
            return False
        if container_id is None:
            return True
        with open(f"/proc/{conmon_pid}/cmdline", "rb") as f:
            return container_id.encode() in f.read().split(b"\0")
    except (OSError, ValueError):
        return False


def _file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
