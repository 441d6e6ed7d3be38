"""The pod sandbox record and its states.

  RunPodSandbox         all made          StopPodSandbox            RemovePodSandbox
 ──────────────► CREATING ───────► READY ─────────────────► NOTREADY ─────────────────► (gone)
                    │                │                         ▲
                    │                └─ at start: netns or ────┘
                    │                   infra process gone
                    └─ a step failed, or found at start: unwound and deleted (never listed)

CREATING is written before the first resource is made, so a daemon killed in
the middle of RunPodSandbox finds the record at start and removes everything
the sandbox may own (every step's undo is idempotent). A CREATING sandbox is
never returned to clients. All paths derive from the id (sandbox_resources).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from api import api_pb2


class SandboxState(StrEnum):
    CREATING = "creating"
    READY = "ready"
    NOTREADY = "notready"


@dataclass(frozen=True)
class SandboxRecord:
    id: str
    config: bytes  # the PodSandboxConfig as the kubelet sent it
    runtime_handler: str
    created_at: int  # ns since the epoch
    state: SandboxState
    fingerprint: str  # of the RunPodSandbox request, for idempotent retries
    ns_dir: str  # where the pinned namespaces live (runroot)
    pod_dir: str  # resolv.conf, hosts, hostname (root)
    run_dir: str  # volatile per-pod directory (runroot): shm mount, infra bundle
    shm: str  # the pod's /dev/shm mount point, "" with host IPC
    cgroup: str  # the pod cgroup's path in each hierarchy
    cgroup_runc: str  # the same for an OCI config's cgroupsPath
    netns: str = ""  # pinned network namespace, "" with host network
    ipcns: str = ""
    utsns: str = ""
    ips: tuple[str, ...] = ()
    network_attached: bool = False  # CNI ADD done and not yet undone by DEL
    infra_pid: int = 0  # the process holding a shared PID namespace, 0 when none runs
    infra_start: int = 0  # its start time (clock ticks after boot), to detect pid reuse
    pidns: str = ""  # /proc/<infra_pid>/ns/pid: what containers join, "" when not shared
    # LinuxContainerResources set by UpdatePodSandboxResources; b"" = still the config's
    resources: bytes = b""
    overhead: bytes = b""

    @property
    def pod_files(self) -> dict[str, str]:
        """resolv.conf, hostname and hosts by name: what containers bind-mount."""
        return {n: f"{self.pod_dir}/{n}" for n in ("resolv.conf", "hostname", "hosts")}

    def pod_config(self) -> api_pb2.PodSandboxConfig:
        return api_pb2.PodSandboxConfig.FromString(self.config)

    def pod_resources(self) -> tuple[api_pb2.LinuxContainerResources | None,
                                      api_pb2.LinuxContainerResources | None]:
        """(resources, overhead) in effect: the last update's, else the config's; None = unset."""
        linux = self.pod_config().linux
        res = (api_pb2.LinuxContainerResources.FromString(self.resources) if self.resources
               else linux.resources if linux.HasField("resources") else None)
        over = (api_pb2.LinuxContainerResources.FromString(self.overhead) if self.overhead
                else linux.overhead if linux.HasField("overhead") else None)
        return res, over

    @property
    def metadata(self) -> api_pb2.PodSandboxMetadata:
        return self.pod_config().metadata

    @property
    def cri_state(self) -> api_pb2.PodSandboxState:
        if self.state is SandboxState.READY:
            return api_pb2.PodSandboxState.SANDBOX_READY
        return api_pb2.PodSandboxState.SANDBOX_NOTREADY


def reservation_name(meta: api_pb2.PodSandboxMetadata) -> str:
    """The pod name the CRI makes unique: namespace, name, uid and attempt."""
    return f"{meta.name}_{meta.namespace}_{meta.uid}_{meta.attempt}"
