"""crib's Prometheus metrics: values move with calls, /metrics parses, stop frees the port."""

from __future__ import annotations

import asyncio
import gzip
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import api_pb2, api_pb2_grpc
from cri import metrics
from cri.boundary import Gate, service_handler
from cri.errors import InvalidArgument, NotFound


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    metrics.disable()
    yield
    metrics.disable()
    for kind in metrics.STATE_KINDS:
        metrics.unregister_state_source(kind)


def fetch(port: int, path: str = "/metrics",
          headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await asyncio.to_thread(fetch, port)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return samples(body.decode())


def test_disabled_records_nothing() -> None:
    assert not metrics.ENABLED
    metrics.observe_rpc("Version", "OK", 0.001)
    metrics.record_pull(10, 1.0, True)
    metrics.record_failure("RunPodSandbox", "cni")
    assert metrics.registry() is None
    assert metrics.exposition() == (b"", {"Content-Type": "text/plain; charset=utf-8"})


def test_counters_move_with_calls_over_http() -> None:
    async def main() -> None:
        metrics.register_state_source(
            "containers", lambda: {"CONTAINER_RUNNING": 2, "CONTAINER_EXITED": 1})
        metrics.register_state_source("sandboxes", lambda: {"SANDBOX_READY": 1})
        server = await metrics.start_server("127.0.0.1:0")
        try:
            assert metrics.ENABLED
            before = await scrape(server.port)
            key = ("crib_grpc_requests_total", (("code", "OK"), ("method", "Version")))
            assert key not in before

            metrics.observe_rpc("Version", "OK", 0.0002)
            metrics.observe_rpc("Version", "OK", 0.003)
            metrics.observe_rpc("RunPodSandbox", "ALREADY_EXISTS", 0.5)
            metrics.record_pull(1000, 2.0, True)
            metrics.record_pull(50, 0.3, False)
            metrics.record_failure("RunPodSandbox", "cni")
            metrics.record_failure("RunPodSandbox", "cni")

            after = await scrape(server.port)
            assert after[key] == 2
            assert after[("crib_grpc_requests_total",
                          (("code", "ALREADY_EXISTS"), ("method", "RunPodSandbox")))] == 1
            assert after[("crib_grpc_request_duration_seconds_count",
                          (("method", "Version"),))] == 2
            assert after[("crib_grpc_request_duration_seconds_bucket",
                          (("le", "0.00025"), ("method", "Version")))] == 1
            assert after[("crib_grpc_request_duration_seconds_bucket",
                          (("le", "60.0"), ("method", "Version")))] == 2
            assert after[("crib_image_pull_bytes_total", ())] == 1050
            assert after[("crib_image_pulls_total", (("result", "success"),))] == 1
            assert after[("crib_image_pulls_total", (("result", "failure"),))] == 1
            assert after[("crib_image_pull_duration_seconds_count", ())] == 1
            assert after[("crib_operation_failures_total",
                          (("operation", "RunPodSandbox"), ("step", "cni")))] == 2
            assert after[("crib_containers", (("state", "CONTAINER_RUNNING"),))] == 2
            assert after[("crib_containers", (("state", "CONTAINER_EXITED"),))] == 1
            assert after[("crib_sandboxes", (("state", "SANDBOX_READY"),))] == 1
            assert after[("process_open_fds", ())] > 0
            assert not any(name.endswith("_created") for name, _ in after)
        finally:
            await server.stop()

    asyncio.run(main())


def test_state_source_is_read_at_scrape_time_and_failures_are_contained() -> None:
    counts = {"SANDBOX_READY": 1}
    metrics.register_state_source("sandboxes", lambda: dict(counts))

    def broken() -> dict[str, int]:
        raise RuntimeError("store is gone")

    metrics.register_state_source("containers", broken)
    metrics.enable()
    first = samples(metrics.exposition()[0].decode())
    counts["SANDBOX_READY"] = 5
    second = samples(metrics.exposition()[0].decode())
    assert first[("crib_sandboxes", (("state", "SANDBOX_READY"),))] == 1
    assert second[("crib_sandboxes", (("state", "SANDBOX_READY"),))] == 5
    assert not any(name == "crib_containers" for name, _ in second)


def test_unknown_state_kind_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="'pods'"):
        metrics.register_state_source("pods", dict)


def test_http_details() -> None:
    async def main() -> None:
        server = await metrics.start_server("127.0.0.1:0")
        try:
            status, _, _ = await asyncio.to_thread(fetch, server.port, "/nope")
            assert status == 404
            status, headers, body = await asyncio.to_thread(
                fetch, server.port, "/metrics", {"Accept-Encoding": "gzip"})
            assert status == 200 and headers["Content-Encoding"] == "gzip"
            assert "crib_" in gzip.decompress(body).decode()
            status, headers, body = await asyncio.to_thread(
                fetch, server.port, "/metrics",
                {"Accept": "application/openmetrics-text; version=1.0.0"})
            assert headers["Content-Type"].startswith("application/openmetrics-text")
            assert body.decode().rstrip().endswith("# EOF")

            # A garbage request gets a 400 and does not hurt the server.
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"garbage\r\n\r\n")
            await writer.drain()
            assert (await reader.read()).startswith(b"HTTP/1.1 400")
            writer.close()
            await writer.wait_closed()
            assert (await scrape(server.port))
        finally:
            await server.stop()

    asyncio.run(main())


def test_stop_frees_the_port() -> None:
    async def main() -> None:
        server = await metrics.start_server("127.0.0.1:0")
        port = server.port
        await scrape(port)
        # An idle client that never sends its request must not keep the port open.
        _, idle = await asyncio.open_connection("127.0.0.1", port)
        await server.stop()
        idle.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        again = await metrics.start_server(f"127.0.0.1:{port}")
        try:
            assert again.port == port
            await scrape(port)
        finally:
            await again.stop()

    asyncio.run(main())


def test_bind_failure_is_an_oserror() -> None:
    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(OSError):
                await metrics.start_server(f"127.0.0.1:{port}")

    asyncio.run(main())


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:9537", ("127.0.0.1", 9537)),
    ("[::1]:80", ("::1", 80)),
    (":9537", ("", 9537)),
])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(address) == expected


@pytest.mark.parametrize("address", ["9537", "host:", "host:http", "host:70000"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid metrics address"):
        metrics.parse_address(address)


class _FakeRuntime:
    async def Version(self, request: object, context: object) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(version="0.1.0")

    async def ContainerStatus(self, request: api_pb2.ContainerStatusRequest,
                              context: object) -> api_pb2.ContainerStatusResponse:
        raise NotFound(f"container {request.container_id} not found")


def test_the_boundary_records_every_call(tmp_path: Path) -> None:
    async def main() -> None:
        registry = metrics.enable()
        gate = Gate()
        gate.ready.set()
        server = grpc.aio.server()
        desc = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
        server.add_generic_rpc_handlers((service_handler(desc, _FakeRuntime(), gate),))
        sock = f"unix://{tmp_path}/m.sock"
        server.add_insecure_port(sock)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(sock) as ch:
                stub = api_pb2_grpc.RuntimeServiceStub(ch)
                await stub.Version(api_pb2.VersionRequest())
                await stub.Version(api_pb2.VersionRequest())
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.ContainerStatus(api_pb2.ContainerStatusRequest(
                            container_id="missing"))
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ListContainers(api_pb2.ListContainersRequest())
        finally:
            await server.stop(None)

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, labels)

        assert value("crib_grpc_requests_total", method="Version", code="OK") == 2
        assert value("crib_grpc_requests_total", method="ContainerStatus",
                     code="NOT_FOUND") == 3
        assert value("crib_grpc_requests_total", method="ListContainers",
                     code="UNIMPLEMENTED") == 1
        assert value("crib_grpc_request_duration_seconds_count", method="ContainerStatus") == 3

    asyncio.run(main())
