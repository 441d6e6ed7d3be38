"""Container records as CRI messages, and the ListContainers / stats filters.

ListContainers runs every second per kubelet, so `ContainerCache` keeps the
message of each record version (records are immutable: a new version is a
new object) and filters compare plain fields before anything is built.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from api import api_pb2
from runtimeservice.container import ContainerRecord
from runtimeservice.filters import labels_match

log = logging.getLogger(__name__)

def _meta_and_image(rec: ContainerRecord) -> tuple[api_pb2.ContainerMetadata,
                                                   api_pb2.ImageSpec]:
    config = rec.container_config()
    image = api_pb2.ImageSpec()
    image.CopyFrom(config.image)
    if not image.user_specified_image:
        image.user_specified_image = config.image.image
    return config.metadata, image


def to_container(rec: ContainerRecord) -> api_pb2.Container:
    meta, image = _meta_and_image(rec)
    return api_pb2.Container(
        id=rec.id, pod_sandbox_id=rec.sandbox_id, metadata=meta, image=image,
        image_ref=rec.image_ref, image_id=rec.image_id, state=rec.cri_state,  # type: ignore[arg-type]
        created_at=rec.created_at, labels=rec.labels, annotations=rec.annotations)


class ContainerCache:
    """The `Container` message of each record version, built once."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[ContainerRecord, api_pb2.Container]] = {}

    def container(self, rec: ContainerRecord) -> api_pb2.Container:
        cached = self._items.get(rec.id)
        if cached is not None and cached[0] is rec:
            return cached[1]
        msg = to_container(rec)
        self._items[rec.id] = (rec, msg)
        return msg

    def forget(self, container_id: str) -> None:
        self._items.pop(container_id, None)


def _signal_enum(name: str) -> int:
    try:
        return int(api_pb2.Signal.Value(name.replace("+", "PLUS").replace("-", "MINUS")))
    except ValueError:
        return api_pb2.Signal.RUNTIME_DEFAULT


def _mount(m: dict[str, Any]) -> api_pb2.Mount:
    return api_pb2.Mount(
        container_path=str(m.get("container_path", "")), host_path=str(m.get("host_path", "")),
        readonly=bool(m.get("readonly")), propagation=int(m.get("propagation", 0)),  # type: ignore[arg-type]
        recursive_read_only=bool(m.get("recursive_read_only")))


def to_status(rec: ContainerRecord) -> api_pb2.ContainerStatus:
    meta, image = _meta_and_image(rec)
    status = api_pb2.ContainerStatus(
        id=rec.id, metadata=meta, state=rec.cri_state,  # type: ignore[arg-type]
        created_at=rec.created_at, started_at=rec.started_at, finished_at=rec.finished_at,
        exit_code=rec.exit_code, image=image, image_ref=rec.image_ref, image_id=rec.image_id,
        reason=rec.reason, message=rec.message, labels=rec.labels,
        annotations=rec.annotations, mounts=[_mount(m) for m in rec.mounts],
        log_path=rec.log_path,
        stop_signal=_signal_enum(rec.stop_signal_name),  # type: ignore[arg-type]
        user=api_pb2.ContainerUser(linux=api_pb2.LinuxContainerUser(
            uid=rec.uid, gid=rec.gid, supplemental_groups=rec.groups)))
    resources = rec.cri_resources()
    if resources is not None:
        status.resources.linux.CopyFrom(resources)
    return status


def verbose_info(rec: ContainerRecord, spec: dict[str, Any] | None) -> dict[str, str]:
    """ContainerStatus's verbose `info`, shaped like CRI-O's (`info` holds JSON)."""
    info: dict[str, Any] = {
        "sandboxID": rec.sandbox_id, "pid": rec.pid, "conmonPid": rec.conmon_pid,
        "runtimeHandler": rec.runtime_handler, "bundle": rec.bundle,
        "cgroup": rec.cgroup, "name": rec.name,
    }
    if spec is not None:
        info["runtimeSpec"] = spec
    return {"info": json.dumps(info, sort_keys=True)}


def matches(rec: ContainerRecord, flt: api_pb2.ContainerFilter | None) -> bool:
    if not rec.visible:
        return False
    if flt is None:
        return True
    if flt.id and not rec.id.startswith(flt.id):
        return False
    if flt.HasField("state") and rec.cri_state != flt.state.state:
        return False
    if flt.pod_sandbox_id and not rec.sandbox_id.startswith(flt.pod_sandbox_id):
        return False
    return labels_match(flt.label_selector, rec.labels)


def stats_matches(rec: ContainerRecord, flt: api_pb2.ContainerStatsFilter | None) -> bool:
    if not rec.visible:
        return False
    if flt is None:
        return True
    if flt.id and not rec.id.startswith(flt.id):
        return False
    if flt.pod_sandbox_id and not rec.sandbox_id.startswith(flt.pod_sandbox_id):
        return False
    return labels_match(flt.label_selector, rec.labels)


def ordered(records: Iterable[ContainerRecord]) -> list[ContainerRecord]:
    return sorted(records, key=lambda r: (r.created_at, r.id))
