"""CheckpointContainer on a crib container: checkpoint.py with what the record knows.

Order of the checks, each with its own error: the container exists
(NotFound) → it is running (FailedPrecondition) → the archive location is
an absolute file name in an existing directory (InvalidArgument) → `criu
check` passes on this host (FailedPrecondition with criu's own reason) → the
dump (the runtime's error, with CRIU's).

The container's lock is held for the whole dump, so its exit cannot be
recorded half-way (a container killed meanwhile is recorded right after).
CRIU's images are staged under `<root>/checkpoints` (persistent storage, not
the runroot's tmpfs: they hold every memory page) and removed afterwards; the
container keeps running.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cri.errors import CribError, FailedPrecondition, InvalidArgument
from runtimeservice.checkpoint import CheckpointResult, ContainerInfo, checkpoint
from runtimeservice.container import ContainerRecord, ContainerState
from runtimeservice.metric_descriptors import MetricTarget

if TYPE_CHECKING:
    from runtimeservice.containers import ContainerManager

log = logging.getLogger(__name__)

WORK_DIR = "checkpoints"


def container_info(mgr: ContainerManager, rec: ContainerRecord) -> ContainerInfo:
    """What the archive's config.dump says about the container (CRI-O's fields)."""
    config = rec.container_config()
    sandbox = mgr.sandboxes.find(rec.sandbox_id)
    name = config.metadata.name
    if sandbox is not None:
        meta = sandbox.metadata
        name = MetricTarget.for_container(rec.id, config.metadata.name, meta.name,
                                          meta.namespace, meta.uid, config.metadata.attempt,
                                          "").name
    image = config.image.user_specified_image or config.image.image
    return ContainerInfo(id=rec.id, name=name, image=image, image_ref=rec.image_id,
                         image_name=rec.image_ref, runtime=rec.runtime_handler,
                         created_at=rec.created_at)


def _lowers(mgr: ContainerManager, rec: ContainerRecord) -> list[Path]:
    """The image's layer directories (to list what opaque directories hide); [] if gone."""
    image = mgr.images.find(rec.image_id) if rec.image_id else None
    if image is None:
        return []
    with contextlib.suppress(CribError, OSError):
        return mgr.images.lowerdirs(image)
    return []


def _require_running(rec: ContainerRecord) -> None:
    if rec.state is not ContainerState.RUNNING:
        raise FailedPrecondition(f"cannot checkpoint container {rec.id}: it is "
                                 f"{rec.state.value}, only a running container can be "
                                 "checkpointed")


async def checkpoint_container(mgr: ContainerManager, container_id: str, location: str,
                               timeout: float = 0) -> CheckpointResult:
    """Checkpoint a running container into the archive at `location` (it keeps running).

    `timeout` in seconds, 0 for the runtime's default.
    """
    if timeout < 0:
        raise InvalidArgument(f"checkpoint timeout {timeout:g} is negative")
    rec = mgr.get(container_id)
    _require_running(rec)
    async with mgr.store.lock(rec.id):
        rec = mgr.get(rec.id)
        _require_running(rec)
        result = await checkpoint(
            mgr.runtime(rec.runtime_handler), rec.id, rec.bundle, rec.paths.upper, location,
            work_dir=Path(mgr.cfg.root) / WORK_DIR, info=container_info(mgr, rec),
            rootfs_lowers=_lowers(mgr, rec), timeout=timeout or None)
    log.info("container %s checkpointed to %s (%d bytes)", rec.id[:12], result.archive,
             result.size)
    return result
