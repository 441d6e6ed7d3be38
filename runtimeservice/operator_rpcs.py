"""The operator's RPCs of RuntimeService: events, metrics, checkpoints.

`OperatorHandlers` is a mixin: RuntimeService inherits it, and calls
`init_operator()` once `self.containers` and `self.sandboxes` exist (it wires
the event hub into the container layer and registers the Prometheus state
sources) and merges `await operator_info()` into Status' verbose info.

  GetContainerEvents        events_rpcs.py (the stream, the start-up replay)
  ListMetricDescriptors     the cAdvisor descriptors (metric_descriptors.py)
  ListPodSandboxMetrics     every visible pod and its live containers, read now
  StreamPodSandboxMetrics   the same, in batches of METRICS_BATCH pods
  CheckpointContainer       container_checkpoint.py

Checkpointing has no Status field of its own: the verbose `info` map has a
"checkpoint" entry, `{"available": bool, "reason": str}`, from `criu check`
(run once, cached), and CheckpointContainer fails with FAILED_PRECONDITION
and criu's reason where it does not pass.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from api import api_pb2
from cri import metrics
from cri.config import Config
from cri.errors import InvalidArgument
from runtimeservice.checkpoint import criu_available
from runtimeservice.container import ContainerRecord
from runtimeservice.container_checkpoint import checkpoint_container
from runtimeservice.container_metrics import MetricsCollector
from runtimeservice.containers import ContainerManager
from runtimeservice.events import DEFAULT_BUFFER
from runtimeservice.events_rpcs import REPLAY_WINDOW, EventHandlers, EventHub
from runtimeservice.metric_descriptors import ALL_GROUPS, list_descriptors
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.sandboxes import SandboxManager

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

METRICS_BATCH = 64  # pods per StreamPodSandboxMetrics message
PodContainers = list[tuple[SandboxRecord, Sequence[ContainerRecord]]]


def sandbox_state_counts(sandboxes: SandboxManager) -> dict[str, int]:
    """Visible sandboxes by state (the Prometheus `crib_sandboxes` gauge)."""
    counts = {s.value: 0 for s in SandboxState if s is not SandboxState.CREATING}
    for rec in sandboxes.store.all():
        if rec.state is not SandboxState.CREATING:
            counts[rec.state.value] += 1
    return counts


class OperatorHandlers(EventHandlers):
    cfg: Config
    containers: ContainerManager
    sandboxes: SandboxManager
    _metrics: MetricsCollector | None

    def init_operator(self) -> None:
        """Wire the event hub into the container layer; register the Prometheus sources."""
        runtime = self.cfg.runtime
        self.event_hub = EventHub(
            buffer=int(getattr(runtime, "event_buffer", DEFAULT_BUFFER)),
            replay_window=float(getattr(runtime, "event_replay_window", REPLAY_WINDOW)))
        self.containers.events = self.event_hub
        self._metrics = None
        metrics.register_state_source("containers", self.containers.state_counts)
        metrics.register_state_source("sandboxes", lambda: sandbox_state_counts(self.sandboxes))

    async def operator_info(self) -> dict[str, str]:
        """Status' verbose entries: whether CheckpointContainer can work here, and why not."""
        ok, reason = await criu_available()
        return {"checkpoint": json.dumps({"available": ok, "reason": reason})}

    # -- metrics

    @property
    def metrics_collector(self) -> MetricsCollector:
        if self._metrics is None:
            self._metrics = MetricsCollector(self.containers.cgroups.layout,
                                             str(self.containers.bundle_dir), ALL_GROUPS)
        return self._metrics

    def _metric_pods(self) -> PodContainers:
        sandboxes = sorted((s for s in self.sandboxes.store.all()
                            if s.state is not SandboxState.CREATING),
                           key=lambda s: (s.created_at, s.id))
        return [(s, [r for r in self.containers.pod_containers(s.id) if r.live])
                for s in sandboxes]

    async def ListMetricDescriptors(self, request: api_pb2.ListMetricDescriptorsRequest,
                                    context: Ctx) -> api_pb2.ListMetricDescriptorsResponse:
        return api_pb2.ListMetricDescriptorsResponse(
            descriptors=list_descriptors(self.metrics_collector.groups))

    async def ListPodSandboxMetrics(self, request: api_pb2.ListPodSandboxMetricsRequest,
                                    context: Ctx) -> api_pb2.ListPodSandboxMetricsResponse:
        return api_pb2.ListPodSandboxMetricsResponse(
            pod_metrics=await self.metrics_collector.pods(self._metric_pods()))

    async def StreamPodSandboxMetrics(
            self, request: api_pb2.StreamPodSandboxMetricsRequest, context: Ctx
    ) -> AsyncIterator[api_pb2.StreamPodSandboxMetricsResponse]:
        pods = self._metric_pods()
        for i in range(0, len(pods), METRICS_BATCH):
            batch = await self.metrics_collector.pods(pods[i:i + METRICS_BATCH])
            yield api_pb2.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=batch)

    # -- checkpoint

    async def CheckpointContainer(self, request: api_pb2.CheckpointContainerRequest,
                                  context: Ctx) -> api_pb2.CheckpointContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id must not be empty")
        if not request.location:
            raise InvalidArgument(
                f"CheckpointContainer of {request.container_id}: location (the archive to "
                "write) must not be empty")
        await checkpoint_container(self.containers, request.container_id, request.location,
                                   float(request.timeout))
        return api_pb2.CheckpointContainerResponse()
