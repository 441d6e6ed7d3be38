"""The one error boundary between gRPC and crib's servicers.

Every RPC of a service is registered here, whether the servicer implements it
or not. Each call gets a request id, a log line, an optional span, and a single
place where exceptions become statuses: a CribError keeps its code and message;
anything else is logged with its traceback and answered INTERNAL. Handlers
never call context.abort themselves.

Servicer methods are `async def Name(request, context) -> Response` for unary
calls and async generators `async def Name(request, context)` yielding
responses for server-streaming calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, message

from api import api_pb2
from cri import logs, metrics, tracing
from cri.errors import CribError, InvalidArgument, Unavailable, Unimplemented

log = logging.getLogger("cri.rpc")

# Calls that only read state: logged at DEBUG, everything else at INFO.
READ_ONLY = frozenset({
    "Version", "Status", "RuntimeConfig", "ImageFsInfo", "ListMetricDescriptors",
    "GetContainerEvents",
})
READ_ONLY_PREFIXES = ("List", "Stream")
READ_ONLY_SUFFIXES = ("Status", "Stats")

# Request fields worth putting on a span and in the log line.
_KEY_FIELDS = ("pod_sandbox_id", "container_id", "exec_id")

Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


def is_read_only(name: str) -> bool:
    return (name in READ_ONLY or name.startswith(READ_ONLY_PREFIXES)
            or name.endswith(READ_ONLY_SUFFIXES))


def key_attributes(request: message.Message) -> dict[str, str]:
    """The ids and image references a request is about."""
    attrs: dict[str, str] = {}
    for name in _KEY_FIELDS:
        if name in request.DESCRIPTOR.fields_by_name:
            value = getattr(request, name)
            if value:
                attrs[name] = value
    image = getattr(request, "image", None)
    if isinstance(image, api_pb2.ImageSpec) and image.image:
        attrs["image"] = image.image
    config = getattr(request, "config", None)
    meta = getattr(config, "metadata", None)
    pod_name: str = getattr(meta, "name", "") if meta is not None else ""
    if pod_name:
        attrs["name"] = pod_name
        namespace: str = getattr(meta, "namespace", "")
        if namespace:
            attrs["namespace"] = namespace
    return attrs


class Gate:
    """Answers UNAVAILABLE until the daemon has finished recovering its state."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.reason = "crib is starting: recovering state"

    def check(self, name: str) -> None:
        if not self.ready.is_set() and name not in ("Version", "Status"):
            raise Unavailable(self.reason)


def _status_for(exc: BaseException, name: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, CribError):
        return exc.code, exc.message
    return grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(exc).__name__}: {exc}"[:512]


class _Call:
    """Bookkeeping shared by unary and streaming wrappers."""

    def __init__(self, name: str, request: message.Message | _Undecodable) -> None:
        self.name = name
        self.level = logging.DEBUG if is_read_only(name) else logging.INFO
        self.undecodable = request.error if isinstance(request, _Undecodable) else None
        self.attrs = {} if isinstance(request, _Undecodable) else key_attributes(request)
        self.rid = secrets.token_hex(4)
        self.started = time.monotonic()
        # Each RPC runs in its own task, so these stay local to this call.
        logs.REQUEST_ID.set(self.rid)
        logs.RPC_NAME.set(name)

    def begin(self) -> None:
        if log.isEnabledFor(self.level):
            extra = " ".join(f"{k}={v}" for k, v in self.attrs.items())
            log.log(self.level, "request %s", extra)

    def check(self, gate: Gate, impl: Handler | None) -> None:
        if self.undecodable is not None:
            raise self.undecodable
        gate.check(self.name)
        if impl is None:
            raise Unimplemented(f"{self.name} is not implemented by crib yet")

    def fail(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code, msg = _status_for(exc, self.name)
        if metrics.ENABLED:
            metrics.observe_rpc(self.name, code.name, time.monotonic() - self.started)
        if isinstance(exc, CribError):
            level = logging.DEBUG if isinstance(exc, Unimplemented) else logging.INFO
            log.log(level, "failed %s: %s", code.name, msg)
        else:
            log.error("unexpected error", exc_info=exc)
        return code, msg

    def done(self) -> None:
        if metrics.ENABLED:
            metrics.observe_rpc(self.name, "OK", time.monotonic() - self.started)
        if log.isEnabledFor(self.level):
            log.log(self.level, "ok in %.1f ms", (time.monotonic() - self.started) * 1000)


def _span(call: _Call) -> Any:
    tracer = tracing.tracer()
    if tracer is None:
        return None
    attrs = {f"cri.{k}": v for k, v in call.attrs.items()}
    attrs["rpc.method"] = call.name
    attrs["crib.request_id"] = call.rid
    return tracer.start_as_current_span(f"cri/{call.name}", attributes=attrs,
                                        record_exception=False, set_status_on_exception=False)


def _wrap_unary(name: str, impl: Handler | None, gate: Gate) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(name, request)
        span_cm = _span(call)
        span = span_cm.__enter__() if span_cm is not None else None
        try:
            call.begin()
            try:
                call.check(gate, impl)
                assert impl is not None
                response = await impl(request, context)
            except asyncio.CancelledError:
                log.info("cancelled by the client")
                raise
            except Exception as exc:
                code, msg = call.fail(exc)
                if span is not None:
                    tracing.set_error(span, f"{code.name}: {msg}")
                await context.abort(code, msg)
            call.done()
            return response
        finally:
            if span_cm is not None:
                span_cm.__exit__(None, None, None)

    return handle


def _wrap_stream(name: str, impl: Handler | None, gate: Gate) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(name, request)
        call.begin()
        try:
            call.check(gate, impl)
            assert impl is not None
            async for item in impl(request, context):
                yield item
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            code, msg = call.fail(exc)
            await context.abort(code, msg)
        call.done()

    return handle


class _Undecodable:
    """Stands in for a request whose bytes did not decode, so the boundary can answer it."""

    def __init__(self, cls: type[message.Message], error: Exception) -> None:
        self.error = InvalidArgument(f"cannot decode the request as {cls.DESCRIPTOR.full_name}: "
                                     f"{error}")


def _safe_deserializer(cls: type[message.Message]) -> Callable[[bytes], Any]:
    # A raising deserializer would make grpc log a traceback and answer with
    # its own status; decoding here keeps garbage an ordinary INVALID_ARGUMENT.
    def parse(data: bytes) -> message.Message | _Undecodable:
        try:
            return cls.FromString(data)
        except message.DecodeError as exc:
            return _Undecodable(cls, exc)

    return parse


def service_handler(service: descriptor.ServiceDescriptor, servicer: object,
                    gate: Gate) -> grpc.GenericRpcHandler:
    """A generic handler registering every method of `service` through the boundary."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        req_cls = getattr(api_pb2, method.input_type.name)
        resp_cls = getattr(api_pb2, method.output_type.name)
        impl = getattr(servicer, method.name, None)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method.name, impl, gate),
                request_deserializer=_safe_deserializer(req_cls),
                response_serializer=resp_cls.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method.name, impl, gate),
                request_deserializer=_safe_deserializer(req_cls),
                response_serializer=resp_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
