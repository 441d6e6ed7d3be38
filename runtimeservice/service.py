"""RuntimeService: thin RPC handlers that validate and delegate."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from api import api_pb2
from cri import __version__
from cri.config import Config
from cri.fsutil import atomic_write_json, read_json
from cri.streaming.server import StreamingServer
from runtimeservice.container_images import ImageManagerSource
from runtimeservice.container_rpcs import ContainerHandlers
from runtimeservice.containers import ContainerManager
from runtimeservice.handlers import HandlerRegistry
from runtimeservice.netready import network_condition
from runtimeservice.operator_rpcs import OperatorHandlers
from runtimeservice.sandboxes import SandboxManager
from runtimeservice.streaming_backend import ContainerStreamingBackend
from runtimeservice.streaming_rpcs import StreamingHandlers

if TYPE_CHECKING:
    from imageservice.service import ImageService

log = logging.getLogger(__name__)

RUNTIME_NAME = "crib"
CRI_VERSION = "0.1.0"
RUNTIME_API_VERSION = "v1"

Ctx = grpc.aio.ServicerContext[Any, Any]


class RuntimeService(ContainerHandlers, StreamingHandlers, OperatorHandlers):
    """Servicer for runtime.v1.RuntimeService (registered through cri.boundary)."""

    def __init__(self, cfg: Config, images: ImageService) -> None:
        self.cfg = cfg
        self.handlers = HandlerRegistry(cfg)
        self.state_file = Path(cfg.root) / "runtime-config.json"
        self.pod_cidr = ""
        self.sandboxes = SandboxManager(cfg, self.handlers.runtime)
        self.containers = ContainerManager(cfg, self.sandboxes.store,
                                           ImageManagerSource(images.manager),
                                           self.handlers.runtime)
        self.sandboxes.container_hooks = self.containers
        images.set_in_use(self.containers.image_in_use)
        images.set_container_filesystems(self.containers.container_filesystems)
        self.streaming = StreamingServer.from_config(
            cfg.streaming, ContainerStreamingBackend(self.containers, self.sandboxes.get))
        self.init_operator()  # events into the container layer, Prometheus sources

    async def start(self) -> None:
        await self.handlers.refresh(force=True)
        if self.state_file.exists():
            self.pod_cidr = read_json(self.state_file).get("pod_cidr", "")
        await self.sandboxes.start()
        await self.containers.start()

    async def close(self) -> None:
        self.event_hub.close()
        await self.containers.close()

    async def Version(self, request: api_pb2.VersionRequest, context: Ctx
                      ) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(version=CRI_VERSION, runtime_name=RUNTIME_NAME,
                                       runtime_version=__version__,
                                       runtime_api_version=RUNTIME_API_VERSION)

    async def Status(self, request: api_pb2.StatusRequest, context: Ctx
                     ) -> api_pb2.StatusResponse:
        await self.handlers.refresh()
        default, conmon = self.handlers.default(), self.handlers.conmon
        runtime_ready = api_pb2.RuntimeCondition(type="RuntimeReady", status=True)
        problems = [i.problem for i in (default, conmon) if not i.runnable]
        if problems:
            runtime_ready.status = False
            runtime_ready.reason = "RuntimeNotReady"
            runtime_ready.message = "; ".join(problems)
        net_ok, net_reason, net_message = await network_condition(self.sandboxes.network)
        network_ready = api_pb2.RuntimeCondition(type="NetworkReady", status=net_ok,
                                                 reason=net_reason, message=net_message)
        resp = api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=[runtime_ready, network_ready]),
            features=api_pb2.RuntimeFeatures(supplemental_groups_policy=False))
        for name in sorted(self.handlers.handlers):
            info = self.handlers.handlers[name]
            if not info.runnable:
                continue
            resp.runtime_handlers.append(api_pb2.RuntimeHandler(
                name=name if name != self.cfg.runtime.default_handler else "",
                features=api_pb2.RuntimeHandlerFeatures(
                    recursive_read_only_mounts=info.recursive_read_only_mounts,
                    user_namespaces=False)))
            if name == self.cfg.runtime.default_handler:
                # The default handler is listed both unnamed and by name.
                resp.runtime_handlers.append(api_pb2.RuntimeHandler(
                    name=name, features=resp.runtime_handlers[-1].features))
        if request.verbose:
            resp.info["config"] = self.cfg.to_json()
            resp.info["handlers"] = json.dumps({
                n: {"path": i.path, "root": i.root, "runnable": i.runnable,
                    "version": i.version, "problem": i.problem}
                for n, i in self.handlers.handlers.items()}, sort_keys=True)
            resp.info.update(await self.operator_info())
        return resp

    async def RuntimeConfig(self, request: api_pb2.RuntimeConfigRequest, context: Ctx
                            ) -> api_pb2.RuntimeConfigResponse:
        driver = (api_pb2.CgroupDriver.SYSTEMD if self.cfg.runtime.cgroup_driver == "systemd"
                  else api_pb2.CgroupDriver.CGROUPFS)
        return api_pb2.RuntimeConfigResponse(
            linux=api_pb2.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def UpdateRuntimeConfig(self, request: api_pb2.UpdateRuntimeConfigRequest,
                                  context: Ctx) -> api_pb2.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr and cidr != self.pod_cidr:
            atomic_write_json(self.state_file, {"pod_cidr": cidr})
            self.pod_cidr = cidr
            log.info("pod CIDR set to %s", cidr)
        return api_pb2.UpdateRuntimeConfigResponse()

    # -- pod sandboxes

    async def RunPodSandbox(self, request: api_pb2.RunPodSandboxRequest, context: Ctx
                            ) -> api_pb2.RunPodSandboxResponse:
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=await self.sandboxes.run(request))

    async def StopPodSandbox(self, request: api_pb2.StopPodSandboxRequest, context: Ctx
                             ) -> api_pb2.StopPodSandboxResponse:
        await self.sandboxes.stop(request.pod_sandbox_id)
        return api_pb2.StopPodSandboxResponse()

    async def RemovePodSandbox(self, request: api_pb2.RemovePodSandboxRequest, context: Ctx
                               ) -> api_pb2.RemovePodSandboxResponse:
        await self.sandboxes.remove(request.pod_sandbox_id)
        return api_pb2.RemovePodSandboxResponse()

    async def PodSandboxStatus(self, request: api_pb2.PodSandboxStatusRequest, context: Ctx
                               ) -> api_pb2.PodSandboxStatusResponse:
        resp = self.sandboxes.status(request.pod_sandbox_id, request.verbose)
        resp.containers_statuses.extend(self.containers.pod_container_statuses(resp.status.id))
        resp.timestamp = time.time_ns()
        return resp

    async def ListPodSandbox(self, request: api_pb2.ListPodSandboxRequest, context: Ctx
                             ) -> api_pb2.ListPodSandboxResponse:
        flt = request.filter if request.HasField("filter") else None
        return api_pb2.ListPodSandboxResponse(items=self.sandboxes.list(flt))

    async def StreamPodSandboxes(self, request: api_pb2.StreamPodSandboxesRequest,
                                 context: Ctx) -> AsyncIterator[api_pb2.StreamPodSandboxesResponse]:
        flt = request.filter if request.HasField("filter") else None
        for batch in self.sandboxes.batches(flt):
            yield api_pb2.StreamPodSandboxesResponse(pod_sandboxes=batch)

    async def UpdatePodSandboxResources(
            self, request: api_pb2.UpdatePodSandboxResourcesRequest, context: Ctx
    ) -> api_pb2.UpdatePodSandboxResourcesResponse:
        await self.sandboxes.update_resources(request)
        return api_pb2.UpdatePodSandboxResourcesResponse()
