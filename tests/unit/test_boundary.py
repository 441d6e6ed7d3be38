"""The error boundary: statuses for domain errors, INTERNAL for bugs, UNIMPLEMENTED gaps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from api import api_pb2, api_pb2_grpc
from cri import tracing
from cri.boundary import Gate, is_read_only, key_attributes, service_handler
from cri.config import TracingConfig
from cri.errors import AlreadyExists, NotFound


class FakeRuntime:
    async def Version(self, request: Any, context: Any) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(version=request.version)

    async def ContainerStatus(self, request: Any, context: Any) -> Any:
        raise NotFound(f"container {request.container_id} not found")

    async def RemoveContainer(self, request: Any, context: Any) -> Any:
        raise ZeroDivisionError("boom")

    async def RunPodSandbox(self, request: Any, context: Any) -> Any:
        raise AlreadyExists("pod exists")

    async def StreamContainers(self, request: Any, context: Any
                               ) -> AsyncIterator[api_pb2.StreamContainersResponse]:
        for i in range(3):
            yield api_pb2.StreamContainersResponse(
                containers=[api_pb2.Container(id=str(i))])
        raise NotFound("stream ended badly")


def run_with_server(tmp_path: Path, gate_ready: bool, body: Any) -> Any:
    async def main() -> Any:
        gate = Gate()
        if gate_ready:
            gate.ready.set()
        server = grpc.aio.server()
        desc = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
        server.add_generic_rpc_handlers((service_handler(desc, FakeRuntime(), gate),))
        sock = f"unix://{tmp_path}/t.sock"
        server.add_insecure_port(sock)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(sock) as ch:
                return await body(api_pb2_grpc.RuntimeServiceStub(ch))
        finally:
            await server.stop(None)

    return asyncio.run(main())


async def code_of(awaitable: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_statuses(tmp_path: Path) -> None:
    async def body(stub: Any) -> None:
        v = await stub.Version(api_pb2.VersionRequest(version="x"))
        assert v.version == "x"
        code, msg = await code_of(stub.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id="abc")))
        assert code == grpc.StatusCode.NOT_FOUND and msg == "container abc not found"
        code, msg = await code_of(stub.RemoveContainer(api_pb2.RemoveContainerRequest()))
        assert code == grpc.StatusCode.INTERNAL and "ZeroDivisionError" in msg
        code, msg = await code_of(stub.RunPodSandbox(api_pb2.RunPodSandboxRequest()))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        code, msg = await code_of(stub.ExecSync(api_pb2.ExecSyncRequest()))
        assert code == grpc.StatusCode.UNIMPLEMENTED and "ExecSync" in msg
        got = []
        call = stub.StreamContainers(api_pb2.StreamContainersRequest())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for item in call:
                got.append(item.containers[0].id)
        assert got == ["0", "1", "2"]
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        code, msg = await code_of(stub.GetContainerEvents(api_pb2.GetEventsRequest()).read())
        assert code == grpc.StatusCode.UNIMPLEMENTED and "GetContainerEvents" in msg

    run_with_server(tmp_path, True, body)


def test_gate_answers_unavailable_until_ready(tmp_path: Path) -> None:
    async def body(stub: Any) -> None:
        assert (await stub.Version(api_pb2.VersionRequest())) is not None
        code, _ = await code_of(stub.ContainerStatus(api_pb2.ContainerStatusRequest()))
        assert code == grpc.StatusCode.UNAVAILABLE

    run_with_server(tmp_path, False, body)


def test_read_only_classification() -> None:
    for name in ("ListContainers", "ContainerStatus", "PodSandboxStats", "Version",
                 "StreamImages", "ImageFsInfo", "ListMetricDescriptors"):
        assert is_read_only(name), name
    for name in ("RunPodSandbox", "CreateContainer", "PullImage", "RemoveImage", "ExecSync",
                 "UpdateRuntimeConfig", "ReopenContainerLog"):
        assert not is_read_only(name), name


def test_key_attributes() -> None:
    req = api_pb2.CreateContainerRequest(pod_sandbox_id="p1", config=api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name="web")))
    assert key_attributes(req) == {"pod_sandbox_id": "p1", "name": "web"}
    pull = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image="busybox"))
    assert key_attributes(pull) == {"image": "busybox"}


def test_tracing_none_installs_nothing() -> None:
    tracing.setup(TracingConfig(exporter="none"))
    assert tracing.tracer() is None
    with tracing.child_span("x") as span:
        assert span is None


def test_tracing_console_records_rpc_spans(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                           ) -> None:
    tracing.setup(TracingConfig(exporter="console"))
    try:
        async def body(stub: Any) -> None:
            await code_of(stub.ContainerStatus(
                api_pb2.ContainerStatusRequest(container_id="c123")))

        run_with_server(tmp_path, True, body)
    finally:
        tracing.shutdown()
    out = capfd.readouterr().out
    assert '"name": "cri/ContainerStatus"' in out
    assert '"cri.container_id": "c123"' in out
    assert "NOT_FOUND" in out
