"""Domain exceptions that carry their gRPC status code.

Domain code raises these; the one error boundary (cri.boundary) turns them into
gRPC statuses. Anything else that escapes a handler is a bug: the boundary logs
it with its traceback and answers INTERNAL.
"""

from __future__ import annotations

import grpc


class CribError(Exception):
    """Base class: an error with a gRPC status code and a client-facing message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CribError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CribError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CribError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CribError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CribError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CribError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(CribError):
    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(CribError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unimplemented(CribError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(CribError):
    code = grpc.StatusCode.INTERNAL
