"""CheckpointContainer: dump a running container with CRIU, through the OCI
runtime, into a checkpoint archive (format: `checkpoint_archive.py`).

Flow (`checkpoint`): `criu check` must pass on this host (else
FailedPrecondition with criu's own reason; `criu_available` is also what
`Status` asks before advertising the capability) → the container must be
running → freeze it (`<runtime> pause`) so the files copied match the dumped
memory → `<runtime> checkpoint --image-path <stage>/checkpoint --work-path
<stage> --leave-running` → collect the writable layer's changes → thaw it →
write the archive beside its final location and rename it into place.

Everything temporary lives in one private staging directory under `work_dir`
that is removed whatever happens, so a failed call leaves nothing behind, and a
container this call froze is always thawed.

runc 1.1 flags used: the global `--criu <path>`, and `checkpoint --image-path
--work-path [--leave-running] [--tcp-established] [--file-locks]`; crun takes
the same sub-command flags (it links libcriu, so no `--criu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri.errors import (
    CribError,
    FailedPrecondition,
    Internal,
    NotFound,
)
from runtimeservice.checkpoint_archive import (
    CHECKPOINT_DIR,
    DUMP_LOG,
    ContainerInfo,
    RootfsChanges,
    mount_destinations,
    scan_upper,
    stage_metadata,
    stage_rootfs,
    validate_archive_path,
    write_archive,
)
from runtimeservice.oci import OciRuntime, OciStatus, RuntimeFlavor

__all__ = ["CRIU_PATH", "CheckpointResult", "ContainerInfo", "checkpoint", "criu_available"]

log = logging.getLogger(__name__)

CRIU_PATH = "/usr/sbin/criu"
CRIU_CHECK_TIMEOUT = 60.0

_criu_checks: dict[str, tuple[bool, str]] = {}


# ------------------------------------------------------------------ criu check


def summarize_criu_output(text: str, limit: int = 400) -> str:
    """criu's error lines without their `Error (file.c:123): ` prefixes, de-duplicated."""
    seen: list[str] = []
    for raw in text.splitlines():
        line = re.sub(r"^\s*(Error|Warn)\s*\([^)]*\):\s*", "", raw).strip()
        if line and line not in seen:
            seen.append(line)
    summary = "; ".join(seen)
    return summary if len(summary) <= limit else summary[: limit - 1] + "…"


async def criu_available(criu_path: str = CRIU_PATH, *, refresh: bool = False) -> tuple[bool, str]:
    """Whether `criu check` passes here (run once per path, cached), and why not.

    The reason is criu's own words (e.g. a kernel feature this VM lacks), or
    "criu is not installed at …"; on success it is criu's verdict ("Looks good.").
    """
    if not refresh and criu_path in _criu_checks:
        return _criu_checks[criu_path]
    result = await _run_criu_check(criu_path)
    _criu_checks[criu_path] = result
    if not result[0]:
        log.info("checkpointing unavailable: %s", result[1])
    return result


async def _run_criu_check(criu_path: str) -> tuple[bool, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            criu_path, "check",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        return False, f"criu is not installed at {criu_path}"
    except OSError as e:
        return False, f"cannot run {criu_path}: {e.strerror}"
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CRIU_CHECK_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError) as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        return False, f"{criu_path} check did not finish within {CRIU_CHECK_TIMEOUT:g}s"
    text = (err + out).decode(errors="replace")
    if proc.returncode != 0:
        detail = summarize_criu_output(text) or "no output"
        return False, f"{criu_path} check failed (exit {proc.returncode}): {detail}"
    return True, summarize_criu_output(text) or "criu check passed"


@dataclass(frozen=True)
class CheckpointResult:
    archive: Path
    size: int  # bytes
    members: tuple[str, ...]  # top-level members written, in order
    changed_files: int  # entries in rootfs-diff.tar
    deleted_files: tuple[str, ...]
    left_running: bool


# ------------------------------------------------------------------ the runtime


def checkpoint_args(
    runtime: OciRuntime,
    container_id: str,
    image_path: Path,
    work_path: Path,
    *,
    leave_running: bool,
    tcp_established: bool = False,
    file_locks: bool = False,
    criu_path: str = CRIU_PATH,
) -> list[str]:
    """Arguments after the global ones for `<runtime> checkpoint` (runc 1.1 / crun flags)."""
    args: list[str] = []
    if runtime.flavor is RuntimeFlavor.RUNC:
        args += ["--criu", criu_path]  # a global flag: runc finds criu in $PATH otherwise
    args += ["checkpoint", "--image-path", str(image_path), "--work-path", str(work_path)]
    if leave_running:
        args.append("--leave-running")
    if tcp_established:
        args.append("--tcp-established")
    if file_locks:
        args.append("--file-locks")
    return [*args, container_id]


def dump_log_errors(work_path: Path, limit: int = 400) -> str:
    """The error lines of CRIU's dump.log, summarized ('' when there are none)."""
    try:
        text = (work_path / DUMP_LOG).read_text(errors="replace")
    except OSError:
        return ""
    errors = [ln for ln in text.splitlines() if re.match(r"^\s*(\(\s*[\d.]+\)\s*)?Error", ln)]
    cleaned = [re.sub(r"^\s*\(\s*[\d.]+\)\s*", "", ln) for ln in errors]
    return summarize_criu_output("\n".join(cleaned), limit)


async def _run_checkpoint(
    runtime: OciRuntime, container_id: str, args: Sequence[str], work_path: Path, timeout: float
) -> None:
    result = await runtime.run(args, what=f"checkpoint {container_id}", check=False,
                               timeout=timeout)
    if result.returncode == 0:
        return
    error = runtime.error(f"checkpoint {container_id}", result.stderr.decode(errors="replace"),
                          result.stdout.decode(errors="replace"))
    # runc names its dump.log, which goes with the staging dir: quote it instead.
    message = re.sub(r"\s*log file: \S+", "", error.message).rstrip()
    detail = await asyncio.to_thread(dump_log_errors, work_path)
    raise type(error)(f"{message} (criu: {detail})" if detail else message)


async def _thaw(runtime: OciRuntime, container_id: str) -> None:
    """Resume the container if it is still paused (it may have been dumped and killed)."""
    try:
        status = (await runtime.state(container_id)).status
    except NotFound:
        return
    if status is OciStatus.PAUSED:
        await runtime.resume(container_id)


def _read_spec(bundle: Path) -> dict[str, Any]:
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"bundle {bundle} has no config.json") from None
    except ValueError as e:
        raise Internal(f"{path} is not valid JSON: {e}") from e
    if not isinstance(spec, dict):
        raise Internal(f"{path} does not hold a JSON object")
    return spec


async def checkpoint(
    runtime: OciRuntime,
    container_id: str,
    bundle: Path | str,
    rootfs_upper: Path,
    archive: Path | str,
    *,
    work_dir: Path,
    leave_running: bool = True,
    info: ContainerInfo | None = None,
    rootfs_lowers: Sequence[Path] = (),
    tcp_established: bool = False,
    file_locks: bool = False,
    timeout: float | None = None,
    criu_path: str = CRIU_PATH,
) -> CheckpointResult:
    """Checkpoint a running container into a CRI-O-format archive at `archive`.

    `work_dir` is where the CRIU images are staged (a private temporary
    directory inside it is removed afterwards); `rootfs_upper` is the
    container's overlay upper dir and `rootfs_lowers` its lower dirs (only
    needed to list what opaque directories hide). Raises InvalidArgument for a
    bad location, FailedPrecondition when CRIU is unusable here or the
    container is not running, DeadlineExceeded after `timeout` seconds
    (default: the runtime's), and the runtime's error (with CRIU's reason) when
    the dump fails. The container keeps running unless `leave_running` is False.
    """
    target = await asyncio.to_thread(validate_archive_path, archive)
    ok, reason = await criu_available(criu_path)
    if not ok:
        raise FailedPrecondition(
            f"cannot checkpoint container {container_id}: CRIU is not usable on this host: "
            f"{reason}")
    if not await asyncio.to_thread(rootfs_upper.is_dir):
        raise NotFound(f"container {container_id}: writable layer {rootfs_upper} does not exist")
    spec = await asyncio.to_thread(_read_spec, Path(bundle))
    state = await runtime.state(container_id)
    if state.status not in (OciStatus.RUNNING, OciStatus.PAUSED):
        raise FailedPrecondition(
            f"cannot checkpoint container {container_id}: it is {state.status.value}, not running")
    info = info or ContainerInfo(id=container_id, runtime=runtime.handler)
    limit = runtime.timeout if timeout is None else timeout
    created_work_dir = not await asyncio.to_thread(work_dir.exists)
    await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
    stage = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=".checkpoint-", dir=work_dir))
    try:
        args = checkpoint_args(runtime, container_id, stage / CHECKPOINT_DIR, stage,
                               leave_running=leave_running, tcp_established=tcp_established,
                               file_locks=file_locks, criu_path=criu_path)
        collect = functools.partial(_stage_changes, stage, rootfs_upper, rootfs_lowers,
                                    mount_destinations(spec))
        changes = await _dump(runtime, container_id, state.status, args, stage, limit, collect)
        await asyncio.to_thread(stage_metadata, stage, spec, info, time.time_ns())
        members = await asyncio.to_thread(write_archive, stage, target)
        size = (await asyncio.to_thread(target.stat)).st_size
    finally:
        await asyncio.to_thread(shutil.rmtree, stage, True)
        if created_work_dir:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(work_dir.rmdir)
    log.info("checkpointed container %s to %s (%d bytes, %d changed, %d deleted files)",
             container_id, target, size, len(changes.include), len(changes.deleted))
    return CheckpointResult(target, size, members, len(changes.include), changes.deleted,
                            leave_running)


def _stage_changes(
    stage: Path, upper: Path, lowers: Sequence[Path], skip: Collection[str]
) -> RootfsChanges:
    changes = scan_upper(upper, lowers, skip)
    stage_rootfs(stage, upper, changes)
    return changes


async def _dump(
    runtime: OciRuntime,
    container_id: str,
    status: OciStatus,
    args: Sequence[str],
    stage: Path,
    timeout: float,
    collect: Callable[[], RootfsChanges],
) -> RootfsChanges:
    """Freeze, dump with CRIU, collect the writable layer's changes (`collect`), thaw."""
    froze = False
    try:
        if status is OciStatus.RUNNING:
            await runtime.pause(container_id)
            froze = True
        await _run_checkpoint(runtime, container_id, args, stage, timeout)
        changes = await asyncio.to_thread(collect)
    except BaseException:
        if froze:
            try:
                await _thaw(runtime, container_id)
            except CribError as thaw_error:
                log.error("container %s may be left paused after a failed checkpoint: %s",
                          container_id, thaw_error.message)
        raise
    if froze:
        await _thaw(runtime, container_id)
    return changes
