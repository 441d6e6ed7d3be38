"""The container RPCs of RuntimeService: thin handlers that validate and delegate.

`ContainerHandlers` is a mixin: RuntimeService inherits it and sets
`self.containers` (a started `ContainerManager`) before serving. Errors are
the domain exceptions the manager raises; the boundary turns them into
statuses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from api import api_pb2
from cri.errors import InvalidArgument
from runtimeservice.containers import STREAM_BATCH, ContainerManager

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]


def _filter(request: Any) -> Any:
    return request.filter if request.HasField("filter") else None


class ContainerHandlers:
    containers: ContainerManager

    async def CreateContainer(self, request: api_pb2.CreateContainerRequest, context: Ctx
                              ) -> api_pb2.CreateContainerResponse:
        return api_pb2.CreateContainerResponse(container_id=await self.containers.create(request))

    async def StartContainer(self, request: api_pb2.StartContainerRequest, context: Ctx
                             ) -> api_pb2.StartContainerResponse:
        await self.containers.start_container(request.container_id)
        return api_pb2.StartContainerResponse()

    async def StopContainer(self, request: api_pb2.StopContainerRequest, context: Ctx
                            ) -> api_pb2.StopContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id must not be empty")
        await self.containers.stop(request.container_id, float(request.timeout))
        return api_pb2.StopContainerResponse()

    async def RemoveContainer(self, request: api_pb2.RemoveContainerRequest, context: Ctx
                              ) -> api_pb2.RemoveContainerResponse:
        if not request.container_id:
            raise InvalidArgument("container_id must not be empty")
        await self.containers.remove(request.container_id)
        return api_pb2.RemoveContainerResponse()

    async def ContainerStatus(self, request: api_pb2.ContainerStatusRequest, context: Ctx
                              ) -> api_pb2.ContainerStatusResponse:
        return await self.containers.status(request.container_id, request.verbose)

    async def ListContainers(self, request: api_pb2.ListContainersRequest, context: Ctx
                             ) -> api_pb2.ListContainersResponse:
        return api_pb2.ListContainersResponse(containers=self.containers.list(_filter(request)))

    async def StreamContainers(self, request: api_pb2.StreamContainersRequest, context: Ctx
                               ) -> AsyncIterator[api_pb2.StreamContainersResponse]:
        for batch in self.containers.batches(_filter(request)):
            yield api_pb2.StreamContainersResponse(containers=batch)

    async def UpdateContainerResources(self, request: api_pb2.UpdateContainerResourcesRequest,
                                       context: Ctx) -> api_pb2.UpdateContainerResourcesResponse:
        if not request.HasField("linux"):
            raise InvalidArgument("UpdateContainerResources needs linux resources")
        await self.containers.update_resources(request.container_id, request.linux)
        return api_pb2.UpdateContainerResourcesResponse()

    async def ReopenContainerLog(self, request: api_pb2.ReopenContainerLogRequest, context: Ctx
                                 ) -> api_pb2.ReopenContainerLogResponse:
        await self.containers.reopen_log(request.container_id)
        return api_pb2.ReopenContainerLogResponse()

    async def ExecSync(self, request: api_pb2.ExecSyncRequest, context: Ctx
                       ) -> api_pb2.ExecSyncResponse:
        if not request.cmd:
            raise InvalidArgument("ExecSync needs a command (cmd is empty)")
        if request.timeout < 0:
            raise InvalidArgument(f"ExecSync timeout {request.timeout} is negative")
        result = await self.containers.exec_sync(request.container_id, request.cmd,
                                                 float(request.timeout))
        return api_pb2.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr,
                                        exit_code=result.exit_code)

    async def ContainerStats(self, request: api_pb2.ContainerStatsRequest, context: Ctx
                             ) -> api_pb2.ContainerStatsResponse:
        return api_pb2.ContainerStatsResponse(
            stats=await self.containers.container_stats(request.container_id))

    async def ListContainerStats(self, request: api_pb2.ListContainerStatsRequest, context: Ctx
                                 ) -> api_pb2.ListContainerStatsResponse:
        return api_pb2.ListContainerStatsResponse(
            stats=await self.containers.list_container_stats(_filter(request)))

    async def StreamContainerStats(self, request: api_pb2.StreamContainerStatsRequest,
                                   context: Ctx
                                   ) -> AsyncIterator[api_pb2.StreamContainerStatsResponse]:
        stats = await self.containers.list_container_stats(_filter(request))
        for i in range(0, len(stats), STREAM_BATCH):
            yield api_pb2.StreamContainerStatsResponse(container_stats=stats[i:i + STREAM_BATCH])

    async def PodSandboxStats(self, request: api_pb2.PodSandboxStatsRequest, context: Ctx
                              ) -> api_pb2.PodSandboxStatsResponse:
        return api_pb2.PodSandboxStatsResponse(
            stats=await self.containers.pod_stats(request.pod_sandbox_id))

    async def ListPodSandboxStats(self, request: api_pb2.ListPodSandboxStatsRequest,
                                  context: Ctx) -> api_pb2.ListPodSandboxStatsResponse:
        return api_pb2.ListPodSandboxStatsResponse(
            stats=await self.containers.list_pod_stats(_filter(request)))

    async def StreamPodSandboxStats(self, request: api_pb2.StreamPodSandboxStatsRequest,
                                    context: Ctx
                                    ) -> AsyncIterator[api_pb2.StreamPodSandboxStatsResponse]:
        stats = await self.containers.list_pod_stats(_filter(request))
        for i in range(0, len(stats), STREAM_BATCH):
            yield api_pb2.StreamPodSandboxStatsResponse(
                pod_sandbox_stats=stats[i:i + STREAM_BATCH])
