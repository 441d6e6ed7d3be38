"""The one CRI client both runtimes are driven through (grpc stubs from api/).

Requests are shaped the way the kubelet sends them: a pod with its own log
directory and cgroup parent, pid namespace per container, a busybox container
that traps SIGTERM (so StopContainer exercises the graceful path). The client
remembers the pods it created and still holds, so a scenario that fails half
way can give them back (`release_all`).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from api import api_pb2, api_pb2_grpc

RPC_TIMEOUT = 120.0
PULL_TIMEOUT = 900.0
STOP_TIMEOUT_S = 10
# PID 1 in the container: exits on SIGTERM, otherwise sleeps without forking. PID 1
# ignores signals it has no handler for, so "ready" is logged once the trap is set.
READY = "ready"
SLEEPER = ["sh", "-c", f"trap 'exit 0' TERM; echo {READY}; sleep 3600 & wait"]
BENCH_LABEL = "crib-bench"
POD_NAMESPACE = "crib-compare"  # CNI plugins get it as K8S_POD_NAMESPACE: cleanup matches it


def describe_error(exc: BaseException) -> str:
    """The note a table cell shows when a runtime could not do a measurement."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "n/a (UNIMPLEMENTED)"
        details = (exc.details() or "").splitlines()[0] if exc.details() else ""
        return f"error ({code.name}): {details}"
    return f"error: {type(exc).__name__}: {exc}"


def is_unimplemented(exc: BaseException) -> bool:
    return (isinstance(exc, grpc.RpcError) and hasattr(exc, "code")
            and exc.code() == grpc.StatusCode.UNIMPLEMENTED)


@dataclass
class Pod:
    id: str
    config: api_pb2.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


class CriClient:
    """RuntimeService + ImageService of one runtime, with bench-shaped helpers."""

    def __init__(self, name: str, socket: Path, log_root: Path, cgroup_root: str) -> None:
        self.name = name
        self.socket = socket
        self.log_root = log_root
        self.cgroup_root = cgroup_root
        self.channel = grpc.insecure_channel(
            f"unix://{socket}", options=[("grpc.max_receive_message_length", 64 << 20)])
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)
        self.pods: dict[str, Pod] = {}

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------ runtime info

    def version(self) -> api_pb2.VersionResponse:
        return self.runtime.Version(api_pb2.VersionRequest(), timeout=RPC_TIMEOUT)

    def ready(self) -> bool:
        """RuntimeReady and NetworkReady both true."""
        status = self.runtime.Status(api_pb2.StatusRequest(), timeout=RPC_TIMEOUT).status
        conds = {c.type: c.status for c in status.conditions}
        return bool(conds.get("RuntimeReady")) and bool(conds.get("NetworkReady"))

    # ------------------------------------------------------------ images

    def pull(self, image: str) -> str:
        """Pull `image`; returns the image ref the runtime reports (its image id)."""
        resp = self.images.PullImage(
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=PULL_TIMEOUT)
        return str(resp.image_ref)

    def remove_image(self, image: str) -> None:
        self.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image)),
                                timeout=RPC_TIMEOUT)

    def has_image(self, image: str) -> bool:
        resp = self.images.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)), timeout=RPC_TIMEOUT)
        return bool(resp.image.id)

    # ------------------------------------------------------------ pods

    def pod_config(self, name: str) -> api_pb2.PodSandboxConfig:
        """A kubelet-like pod config with a fresh uid; creates its log directory."""
        uid = str(uuid.uuid4())
        log_dir = self.log_root / f"bench_{name}_{uid}"
        log_dir.mkdir(parents=True, exist_ok=True)
        ns_opts = api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER,
                                          ipc=api_pb2.POD)
        return api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE,
                                                attempt=0),
            hostname=name[:63],
            log_directory=str(log_dir),
            labels={"app": BENCH_LABEL, "io.kubernetes.pod.name": name},
            linux=api_pb2.LinuxPodSandboxConfig(
                cgroup_parent=f"/{self.cgroup_root}/pod{uid}",
                security_context=api_pb2.LinuxSandboxSecurityContext(
                    namespace_options=ns_opts)))

    def run_pod(self, config: api_pb2.PodSandboxConfig) -> Pod:
        resp = self.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=config),
                                          timeout=RPC_TIMEOUT)
        pod = Pod(resp.pod_sandbox_id, config)
        self.pods[pod.id] = pod
        return pod

    def stop_remove_pod(self, pod: Pod) -> None:
        self.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod.id),
                                    timeout=RPC_TIMEOUT)
        self.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id),
                                      timeout=RPC_TIMEOUT)
        self.pods.pop(pod.id, None)

    # ------------------------------------------------------------ containers

    def container_config(self, name: str, image_ref: str) -> api_pb2.ContainerConfig:
        ns_opts = api_pb2.NamespaceOption(network=api_pb2.POD, pid=api_pb2.CONTAINER,
                                          ipc=api_pb2.POD)
        return api_pb2.ContainerConfig(
            metadata=api_pb2.ContainerMetadata(name=name, attempt=0),
            image=api_pb2.ImageSpec(image=image_ref),
            command=SLEEPER,
            log_path=f"{name}/0.log",
            labels={"app": BENCH_LABEL, "io.kubernetes.container.name": name},
            linux=api_pb2.LinuxContainerConfig(
                resources=api_pb2.LinuxContainerResources(cpu_shares=2, oom_score_adj=1000),
                security_context=api_pb2.LinuxContainerSecurityContext(
                    namespace_options=ns_opts)))

    def create_start(self, pod: Pod, name: str, image_ref: str) -> str:
        config = self.container_config(name, image_ref)
        (Path(pod.config.log_directory) / name).mkdir(exist_ok=True)
        resp = self.runtime.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                           sandbox_config=pod.config), timeout=RPC_TIMEOUT)
        pod.containers.append(resp.container_id)
        self.runtime.StartContainer(
            api_pb2.StartContainerRequest(container_id=resp.container_id), timeout=RPC_TIMEOUT)
        return str(resp.container_id)

    def wait_ready(self, pod: Pod, name: str, timeout: float = 10.0) -> bool:
        """Wait until container `name` has logged READY (its SIGTERM trap is set)."""
        log = Path(pod.config.log_directory) / name / "0.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if f" {READY}" in log.read_text(errors="replace"):
                    return True
            time.sleep(0.005)
        return False

    def stop_remove_container(self, pod: Pod, container_id: str) -> None:
        self.runtime.StopContainer(
            api_pb2.StopContainerRequest(container_id=container_id, timeout=STOP_TIMEOUT_S),
            timeout=RPC_TIMEOUT)
        self.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=container_id),
                                     timeout=RPC_TIMEOUT)
        with contextlib.suppress(ValueError):
            pod.containers.remove(container_id)

    def exec_sync(self, container_id: str, cmd: list[str]) -> int:
        resp = self.runtime.ExecSync(
            api_pb2.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=30),
            timeout=RPC_TIMEOUT)
        return int(resp.exit_code)

    # ------------------------------------------------------------ listing

    def relist(self) -> tuple[int, int, int]:
        """The kubelet's relist plus stats: (pods, containers, container stats) seen."""
        pods = self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=RPC_TIMEOUT)
        ctrs = self.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=RPC_TIMEOUT)
        stats = self.runtime.ListContainerStats(api_pb2.ListContainerStatsRequest(),
                                                timeout=RPC_TIMEOUT)
        return len(pods.items), len(ctrs.containers), len(stats.stats)

    # ------------------------------------------------------------ cleanup

    def release_all(self) -> list[str]:
        """Stop and remove every pod this client still holds; returns the errors met."""
        errors = []
        for pod in list(self.pods.values()):
            try:
                self.stop_remove_pod(pod)
            except grpc.RpcError as exc:
                errors.append(f"{self.name}: pod {pod.id[:12]}: {describe_error(exc)}")
                self.pods.pop(pod.id, None)
        return errors

    def sweep(self) -> list[str]:
        """Remove every pod the runtime lists (whoever made it); returns the errors met."""
        errors = []
        try:
            items = self.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(),
                                                timeout=RPC_TIMEOUT).items
        except grpc.RpcError as exc:
            return [] if is_unimplemented(exc) else [f"{self.name}: list: {describe_error(exc)}"]
        for item in items:
            try:
                self.runtime.StopPodSandbox(
                    api_pb2.StopPodSandboxRequest(pod_sandbox_id=item.id), timeout=RPC_TIMEOUT)
                self.runtime.RemovePodSandbox(
                    api_pb2.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=RPC_TIMEOUT)
            except grpc.RpcError as exc:
                errors.append(f"{self.name}: pod {item.id[:12]}: {describe_error(exc)}")
        self.pods.clear()
        return errors
