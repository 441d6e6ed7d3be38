"""Exec, Attach and PortForward handlers: validation, state checks, and URLs
bound to the full id (records from in-memory fakes of the managers)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from api import api_pb2
from cri.errors import FailedPrecondition, InvalidArgument, NotFound
from cri.streaming.server import StreamingServer
from cri.streaming.tokens import Kind
from runtimeservice.container import ContainerRecord, ContainerState
from runtimeservice.sandbox import SandboxRecord, SandboxState
from runtimeservice.streaming_rpcs import StreamingHandlers
from tests.streamclient.fake_backend import FakeBackend

CID = "c" * 64
SID = "s" * 64


def container(state: ContainerState) -> ContainerRecord:
    return ContainerRecord(id=CID, sandbox_id=SID, name="n", config=b"", fingerprint="",
                           runtime_handler="runc", created_at=0, state=state, dir="/b",
                           persist_dir="/p", log_path="", monitor_log="", cgroup="/g")


def sandbox(state: SandboxState, netns: str = "") -> SandboxRecord:
    return SandboxRecord(id=SID, config=b"", runtime_handler="runc", created_at=0, state=state,
                         fingerprint="", ns_dir="", pod_dir="", run_dir="", shm="", cgroup="",
                         cgroup_runc="", netns=netns)


class Records:
    def __init__(self, record: Any, full_id: str, kind: str) -> None:
        self.record, self.full_id, self.kind = record, full_id, kind

    def get(self, ident: str) -> Any:
        if not self.full_id.startswith(ident):
            raise NotFound(f"{self.kind} {ident!r} not found")
        return self.record


class Service(StreamingHandlers):
    def __init__(self, c_state: ContainerState, s_state: SandboxState) -> None:
        self.containers = cast(Any, Records(container(c_state), CID, "container"))
        self.sandboxes = cast(Any, Records(sandbox(s_state), SID, "pod sandbox"))
        self.streaming = StreamingServer(FakeBackend(), "127.0.0.1", 10010)


def call(coro: Any) -> Any:
    return asyncio.run(coro)


def bound(svc: Service, url: str) -> Any:
    kind, token = url.rsplit("/", 2)[1:]
    entry = svc.streaming.tokens.consume(token)
    assert entry is not None and entry.kind is Kind(kind)
    return entry.request


def test_urls_are_bound_to_the_full_id() -> None:
    svc = Service(ContainerState.RUNNING, SandboxState.READY)
    resp = call(svc.Exec(api_pb2.ExecRequest(container_id="ccc", cmd=["ls"], stdout=True),
                         None))
    assert resp.url.startswith("http://127.0.0.1:10010/exec/")
    assert bound(svc, resp.url).container_id == CID
    resp = call(svc.Attach(api_pb2.AttachRequest(container_id="cc", stdin=True), None))
    req = bound(svc, resp.url)
    assert (req.container_id, req.stdin) == (CID, True)
    resp = call(svc.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="s", port=[80]),
                                None))
    req = bound(svc, resp.url)
    assert (req.pod_sandbox_id, list(req.port)) == (SID, [80])


@pytest.mark.parametrize("state", [ContainerState.CREATED, ContainerState.EXITED])
def test_a_container_that_is_not_running_is_refused(state: ContainerState) -> None:
    svc = Service(state, SandboxState.READY)
    with pytest.raises(FailedPrecondition, match=f"it is {state.value}, not running"):
        call(svc.Exec(api_pb2.ExecRequest(container_id=CID, cmd=["ls"], stdout=True), None))
    with pytest.raises(FailedPrecondition, match="cannot attach to container"):
        call(svc.Attach(api_pb2.AttachRequest(container_id=CID, stdout=True), None))
    assert len(svc.streaming.tokens) == 0


def test_unknown_ids_invalid_requests_and_a_sandbox_not_ready() -> None:
    svc = Service(ContainerState.RUNNING, SandboxState.NOTREADY)
    with pytest.raises(NotFound):
        call(svc.Exec(api_pb2.ExecRequest(container_id="x", cmd=["ls"], stdout=True), None))
    with pytest.raises(InvalidArgument, match="cmd must not be empty"):
        call(svc.Exec(api_pb2.ExecRequest(container_id=CID, stdout=True), None))
    with pytest.raises(InvalidArgument, match="tty and stderr"):
        call(svc.Attach(api_pb2.AttachRequest(container_id=CID, tty=True, stderr=True), None))
    with pytest.raises(InvalidArgument, match="port 0"):
        call(svc.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=SID, port=[0]), None))
    with pytest.raises(FailedPrecondition, match="not ready"):
        call(svc.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id=SID), None))
    with pytest.raises(NotFound):
        call(svc.PortForward(api_pb2.PortForwardRequest(pod_sandbox_id="zz"), None))
    assert len(svc.streaming.tokens) == 0
