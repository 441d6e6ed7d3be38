"""Exec, Attach and PortForward: thin handlers that check and hand out a URL.

`StreamingHandlers` is a mixin of RuntimeService, which sets `containers`,
`sandboxes` and `streaming` (a `StreamingServer` the daemon starts). Each
handler validates the request, checks that the container is running (or the
sandbox ready) — NotFound / FailedPrecondition otherwise — and returns a
single-use URL bound to the request, with the id made full.
"""

from __future__ import annotations

from typing import Any

import grpc

from api import api_pb2
from cri.streaming.server import (
    StreamingServer,
    validate_attach,
    validate_exec,
    validate_port_forward,
)
from runtimeservice.containers import ContainerManager
from runtimeservice.sandboxes import SandboxManager
from runtimeservice.streaming_backend import ready_sandbox, running_container

Ctx = grpc.aio.ServicerContext[Any, Any]


class StreamingHandlers:
    containers: ContainerManager
    sandboxes: SandboxManager
    streaming: StreamingServer

    async def Exec(self, request: api_pb2.ExecRequest, context: Ctx) -> api_pb2.ExecResponse:
        validate_exec(request)
        rec = running_container(self.containers, request.container_id, "exec in")
        req = api_pb2.ExecRequest()
        req.CopyFrom(request)
        req.container_id = rec.id
        return api_pb2.ExecResponse(url=self.streaming.get_exec_url(req))

    async def Attach(self, request: api_pb2.AttachRequest, context: Ctx
                     ) -> api_pb2.AttachResponse:
        validate_attach(request)
        rec = running_container(self.containers, request.container_id, "attach to")
        req = api_pb2.AttachRequest()
        req.CopyFrom(request)
        req.container_id = rec.id
        return api_pb2.AttachResponse(url=self.streaming.get_attach_url(req))

    async def PortForward(self, request: api_pb2.PortForwardRequest, context: Ctx
                          ) -> api_pb2.PortForwardResponse:
        validate_port_forward(request)
        rec = ready_sandbox(self.sandboxes.get, request.pod_sandbox_id)
        req = api_pb2.PortForwardRequest()
        req.CopyFrom(request)
        req.pod_sandbox_id = rec.id
        return api_pb2.PortForwardResponse(url=self.streaming.get_portforward_url(req))
