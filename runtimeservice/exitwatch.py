"""How the daemon learns that a container exited: the files conmon leaves.

When a container exits, conmon writes its exit code to `<exit_dir>/<container
id>` (by rename; the file's mtime is the finish time) and to `<persist_dir>/
exit`, plus `<persist_dir>/oom` when it saw the memory cgroup kill it. Those
files are the ONE exit mechanism: `ExitWatcher` watches the exit directory
(inotify, or polling as a fallback) while the daemon runs, and reports every
file already there when it starts, which is how exits that happened while the
daemon was down are found. `read_exit_file` reads one such file.

When conmon itself is gone without a file (SIGKILLed), there is no exit code
to read: `lost_monitor_exit` is what to record instead (as CRI-O does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import logging
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What CRI-O reports when the monitor vanished without leaving an exit code.
UNKNOWN_EXIT_CODE = 255
REASON_MONITOR_LOST = "ContainerStatusUnknown"


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int
    finished_at_ns: int
    oom_killed: bool = False
    reason: str = ""
    message: str = ""


ExitCallback = Callable[[str, int, int], Awaitable[None] | None]

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_DELETE = 0x00000200
_IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
# g_file_set_contents writes "<name>.XXXXXX" and renames it over <name>.
_TEMP_NAME = re.compile(r"\.[A-Za-z0-9]{6}$")


class ExitWatcher:
    """Calls `callback(container_id, exit_code, finished_at_ns)` once for every
    exit file that appears in the exit directory (and, on start, for those
    already there). inotify when the kernel gives it, else a cheap poll."""

    def __init__(self, exit_dir: str, callback: ExitCallback, poll_interval: float = 1.0) -> None:
        self.exit_dir = exit_dir
        self.callback = callback
        self.poll_interval = poll_interval
        self._seen: dict[str, tuple[int, int]] = {}
        self._fd = -1
        self._poller: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def uses_inotify(self) -> bool:
        return self._fd >= 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(os.makedirs, self.exit_dir, 0o700, True)
        self._fd = _inotify_watch(self.exit_dir, _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_DELETE)
        if self._fd >= 0:
            self._loop.add_reader(self._fd, self._on_events)
        else:
            log.warning("inotify unavailable; polling %s every %gs", self.exit_dir,
                        self.poll_interval)
            self._poller = asyncio.create_task(self._poll())
        self._scan()  # after the watch is set: nothing falls in between

    async def close(self) -> None:
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def forget(self, container_id: str) -> None:
        """Drop what we remember of a container whose exit file was removed."""
        self._seen.pop(container_id, None)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self._scan()

    def _scan(self) -> None:
        try:
            names = os.listdir(self.exit_dir)
        except FileNotFoundError:
            return
        for name in names:
            if not _TEMP_NAME.search(name):
                self._report(name)
        for gone in set(self._seen) - set(names):
            del self._seen[gone]

    def _on_events(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = raw.split(b"\0", 1)[0].decode(errors="surrogateescape")
                if mask & _IN_Q_OVERFLOW:
                    self._scan()
                elif mask & _IN_DELETE:
                    self._seen.pop(name, None)
                elif _is_final_write(mask, name):
                    self._report(name)

    def _report(self, name: str) -> None:
        path = os.path.join(self.exit_dir, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns)
        if self._seen.get(name) == key:
            return
        info = read_exit_file(path)
        if info is None:
            return
        self._seen[name] = key
        try:
            result = self.callback(name, info.exit_code, info.finished_at_ns)
        except Exception:
            log.exception("exit callback for %s failed", name)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("exit callback failed", exc_info=task.exception())


def _is_final_write(mask: int, name: str) -> bool:
    """A rename onto the final name, or a direct write of a non-temporary file."""
    return bool(mask & _IN_MOVED_TO) or bool(
        mask & _IN_CLOSE_WRITE and not _TEMP_NAME.search(name)
    )


def _inotify_watch(path: str, mask: int) -> int:
    """An inotify fd watching `path`, or -1 when inotify is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
        if fd < 0:
            return -1
        if libc.inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(mask)) < 0:
            os.close(fd)
            return -1
        return fd
    except (OSError, AttributeError):
        return -1


def read_exit_file(path: str) -> ExitInfo | None:
    try:
        with open(path) as f:
            text = f.read().strip()
            mtime = os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None
    try:
        code = int(text)
    except ValueError:
        return None  # being written by someone other than conmon's atomic rename
    return ExitInfo(exit_code=code, finished_at_ns=mtime)


def lost_monitor_exit(container_id: str, conmon_pid: int) -> ExitInfo:
    """The exit to record when conmon died without writing an exit file."""
    return ExitInfo(
        exit_code=UNKNOWN_EXIT_CODE,
        finished_at_ns=time.time_ns(),
        reason=REASON_MONITOR_LOST,
        message=f"the monitor (conmon pid {conmon_pid}) of container {container_id} "
        "is gone and left no exit code",
    )
