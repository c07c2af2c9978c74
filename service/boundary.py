"""Where a call meets the code: how errors leave a handler, and how interceptors wrap one.

Servicers decorate their RPCs with `unary` or `streaming`: a domain error
(facemux.models.errors) leaves as the status the one table gives it (service/errors.py),
anything else as INTERNAL with a reference that the log has too. Interceptors wrap a
handler (`WrappingInterceptor.wrap`) with `wrap_handler`, which keeps its kind, and read
how a call ended with `call_status`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from facemux.models.errors import FacemuxError
from facemux.service.errors import status_for

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


# -- errors out of a handler -------------------------------------------------------------------


async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """End the call for `exc`: its status from the table, or INTERNAL (logged). Raises."""
    if isinstance(exc, FacemuxError):
        retry_after = getattr(exc, "retry_after", None)
        hint = () if retry_after is None else (("retry-after", f"{retry_after:g}"),)
        await context.abort(status_for(exc), str(exc), hint)
    ref = uuid.uuid4().hex[:12]
    log.exception("internal error, reference %s", ref, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal server error (reference {ref})")


def unary(
    method: Callable[[Self, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Turn domain errors into statuses; anything unexpected becomes INTERNAL, logged."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await fail(context, exc)
            raise  # unreachable: abort raises

    return wrapper


def streaming(
    method: Callable[[Self, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """`unary` for a handler that yields its responses."""

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await fail(context, exc)

    return wrapper


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline on time.monotonic()'s clock, None when it gave none."""
    left = context.time_remaining()
    return None if left is None else time.monotonic() + left


# -- how a call ended, as interceptors see it -------------------------------------------------


def _as_code(code: Any) -> grpc.StatusCode | None:
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c
    return None


def context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    """The status the handler set (context.set_code, abort), if any."""
    try:
        return _as_code(context.code())
    except Exception:
        return None


def call_status(exc: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call ends with: `exc` is what the handler raised, None if it returned."""
    if exc is None:
        # A handler may set a status with context.set_code() and return normally; one that
        # returns after its deadline answered nobody: the caller got DEADLINE_EXCEEDED.
        code = context_code(context)
        if code is not None:
            return code
        return grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.OK
    if isinstance(exc, grpc.aio.AbortError):
        # context.abort() recorded the status before raising.
        return context_code(context) or grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # gRPC cancels the handler when the client goes away or its deadline passes.
        return grpc.StatusCode.DEADLINE_EXCEEDED if _expired(context) else grpc.StatusCode.CANCELLED
    # grpc.aio answers an unhandled exception with UNKNOWN.
    return context_code(context) or grpc.StatusCode.UNKNOWN


def _expired(context: grpc.aio.ServicerContext) -> bool:
    try:
        remaining = context.time_remaining()
    except Exception:
        return False
    return remaining is not None and remaining <= 0


# -- wrapping a handler ------------------------------------------------------------------------


def behaviour(handler: grpc.RpcMethodHandler) -> Any:
    """The function that serves `handler`, whichever of the four kinds it is."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream
    if handler.request_streaming:
        return handler.stream_unary
    if handler.response_streaming:
        return handler.unary_stream
    return handler.unary_unary


def is_async(fn: Any) -> bool:
    """grpc.aio drives a coroutine or async generator function itself; a plain function
    only through a migration thread pool, which facemux does not use."""
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def wrap_handler(
    handler: grpc.RpcMethodHandler, fn: Callable[..., Any], raw_requests: bool = False
) -> grpc.RpcMethodHandler:
    """A handler served by `fn` in place of `handler`'s behaviour, of the same kind.

    grpc.aio picks how to drive a handler by what kind of function it is (coroutine
    function or async generator function), so `fn` must be of the kind of the one it
    wraps. With `raw_requests`, `fn` gets the request as a stream of undecoded messages,
    whatever the method declares, and parses them itself."""
    streaming = raw_requests or handler.request_streaming
    des = None if raw_requests else handler.request_deserializer
    ser = handler.response_serializer
    if streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(fn, des, ser)
    if streaming:
        return grpc.stream_unary_rpc_method_handler(fn, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(fn, des, ser)
    return grpc.unary_unary_rpc_method_handler(fn, des, ser)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that hands each served method's handler to `wrap`.

    `wrap` must depend only on the handler and the method: its result is kept per method
    and reused for as long as gRPC resolves the method to the same handler (its servicers
    are registered once), so a call does not rebuild its wrappers."""

    def __init__(self) -> None:
        # method -> (the handler gRPC resolved, what wrap made of it); known methods only.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        kept = self._wrapped.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """`handler` itself, or one of its kind (wrap_handler) serving `method`."""
        raise NotImplementedError
