"""The one table that maps facemux's domain errors to gRPC status codes."""

from __future__ import annotations

import grpc
from facemux.models import errors as e

# Most specific first: the first matching class wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (e.FingerprintMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.CheckpointError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (e.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (e.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (e.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (e.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (e.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (e.NotImplementedYetError, grpc.StatusCode.UNIMPLEMENTED),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
