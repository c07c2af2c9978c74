"""Typed errors raised by the facemux client; each carries the gRPC status."""

from __future__ import annotations

import grpc


class FacemuxRpcError(Exception):
    """A call failed; `code` is the gRPC status and `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # Seconds the server asked the caller to wait (trailing metadata `retry-after`), if any.
    retry_after: float | None = None
    # The call's request id as the server answered it (response header `x-request-id`): the
    # caller's own, or the one the server made and logged. "" when no server answered.
    request_id: str = ""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(FacemuxRpcError):
    pass


class NotFound(FacemuxRpcError):
    pass


class AlreadyExists(FacemuxRpcError):
    pass


class FailedPrecondition(FacemuxRpcError):
    pass


class ResourceExhausted(FacemuxRpcError):
    pass


class Unavailable(FacemuxRpcError):
    pass


class DeadlineExceeded(FacemuxRpcError):
    pass


class Unimplemented(FacemuxRpcError):
    pass


class Unauthenticated(FacemuxRpcError):
    pass


class PermissionDenied(FacemuxRpcError):
    pass


class Cancelled(FacemuxRpcError):
    pass


class Internal(FacemuxRpcError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[FacemuxRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}

_SIZE_HINT = (
    " — the message is over the gRPC size limit: send fewer or smaller images per call "
    "(or SwapStream for video), or raise the server's max_message_bytes setting"
)


def from_rpc_error(err: grpc.RpcError) -> FacemuxRpcError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        details += _SIZE_HINT
    out = _BY_CODE.get(code, FacemuxRpcError)(code, details)
    try:
        headers = err.initial_metadata() if hasattr(err, "initial_metadata") else None
        for key, value in headers or ():
            if key == "x-request-id" and isinstance(value, str):
                out.request_id = value
    except (TypeError, ValueError):
        pass
    try:
        trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailers or ():
            if key == "retry-after":
                out.retry_after = float(value)
    except (TypeError, ValueError):
        pass  # a malformed hint is no reason to lose the error itself
    return out
