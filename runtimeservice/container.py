"""The container record and its states.

    CreateContainer          StartContainer           exit (conmon's exit file)
  ────────────────► CREATING ─────► CREATED ─────────────► RUNNING ───────────────► EXITED
                       │               │                                               ▲
                       │               └── killed, or its monitor lost, before start ──┤
                       │                                    monitor lost (conmon gone) ┘
                       └── failure: unwound; crash: unwound at start (never listed)

  RemoveContainer: any listed state → (gone); a running container is killed first.

CREATING is written before the first resource (directory, rootfs mount,
conmon, runtime state) is made, so a daemon killed inside CreateContainer
finds the record at start and removes everything the container may own; a
CREATING container is never returned to clients.

An exit is learned from the exit file conmon writes (exitwatch.py) and
nothing else. When the monitor itself is gone without writing one (killed),
the container is killed and recorded EXITED with code 255 and reason
`ContainerStatusUnknown`, as CRI-O does.

Metadata never changes after creation; `state`, the pids, the times, the
exit and `resources` change only through `RecordStore.update`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from api import api_pb2
from runtimeservice.rootfs import RootfsPaths


class ContainerState(StrEnum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


_CRI_STATE = {
    ContainerState.CREATED: api_pb2.ContainerState.CONTAINER_CREATED,
    ContainerState.RUNNING: api_pb2.ContainerState.CONTAINER_RUNNING,
    ContainerState.EXITED: api_pb2.ContainerState.CONTAINER_EXITED,
}

REASON_COMPLETED = "Completed"
REASON_ERROR = "Error"
REASON_OOM = "OOMKilled"


@dataclass(frozen=True)
class ContainerRecord:
    id: str
    sandbox_id: str
    name: str  # the reservation name (container, pod, namespace, uid, attempt)
    config: bytes  # the ContainerConfig as the kubelet sent it
    fingerprint: str  # of the CreateContainer request, for idempotent retries
    runtime_handler: str  # the sandbox's (resolved: never "")
    created_at: int  # ns since the epoch
    state: ContainerState
    dir: str  # bundle: config.json, the rootfs mount and its writable layer (root)
    persist_dir: str  # conmon's pid, exit and oom files (runroot)
    log_path: str  # the host path conmon writes; "" when the pod has no log directory
    monitor_log: str  # what conmon is told to write (log_path, or a file in persist_dir)
    cgroup: str  # the container's cgroup below each hierarchy root
    image_id: str = ""
    image_ref: str = ""  # a repo digest of the image, else its id
    # The image and everything derived from the spec, known once it is built.
    stop_signal: int = 15
    stop_signal_name: str = "SIGTERM"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()  # CRI Mount fields, host paths resolved
    resources: bytes = b""  # LinuxContainerResources as created / last updated
    pid: int = 0
    conmon_pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    # -- derived

    def container_config(self) -> api_pb2.ContainerConfig:
        return api_pb2.ContainerConfig.FromString(self.config)

    @property
    def paths(self) -> RootfsPaths:
        return RootfsPaths(Path(self.dir))

    @property
    def bundle(self) -> str:
        return self.dir

    @property
    def visible(self) -> bool:
        """Returned to clients (everything but a container still being created)."""
        return self.state is not ContainerState.CREATING

    @property
    def live(self) -> bool:
        """Has (or may have) a process: created or running."""
        return self.state in (ContainerState.CREATED, ContainerState.RUNNING)

    @property
    def cri_state(self) -> int:
        return _CRI_STATE.get(self.state, api_pb2.ContainerState.CONTAINER_UNKNOWN)

    def cri_resources(self) -> api_pb2.LinuxContainerResources | None:
        if not self.resources:
            return None
        return api_pb2.LinuxContainerResources.FromString(self.resources)


def reservation_name(config: api_pb2.ContainerConfig, pod: api_pb2.PodSandboxMetadata) -> str:
    """The name the CRI makes unique: container name and attempt within one pod."""
    meta = config.metadata
    return f"{meta.name}_{pod.name}_{pod.namespace}_{pod.uid}_{meta.attempt}"


def exit_reason(exit_code: int, oom_killed: bool) -> str:
    """The CRI reason for an exit: OOMKilled, Completed (0) or Error."""
    if oom_killed and exit_code != 0:
        return REASON_OOM
    return REASON_COMPLETED if exit_code == 0 else REASON_ERROR
