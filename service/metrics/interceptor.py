"""The standard gRPC server metrics, recorded by a server interceptor."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from facemux.service import boundary

if TYPE_CHECKING:
    from facemux.service.metrics.instruments import Metrics


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """The grpc_type label, spelled as every other gRPC Prometheus library spells it."""
    if request_streaming and response_streaming:
        return "bidi_stream"
    if request_streaming:
        return "client_stream"
    if response_streaming:
        return "server_stream"
    return "unary"


def split_method(full: str) -> tuple[str, str]:
    """'/pkg.Service/Method' -> ('pkg.Service', 'Method')."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


class _Call:
    """Bookkeeping of one RPC."""

    __slots__ = ("_done", "_labels", "_m", "_t0")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self._m = metrics
        self._labels = labels
        self._t0 = time.perf_counter()
        self._done = False
        metrics.grpc_started.labels(*labels).inc()

    def received(self) -> None:
        self._m.grpc_received.labels(*self._labels).inc()

    def sent(self) -> None:
        self._m.grpc_sent.labels(*self._labels).inc()

    def end(self, exc: BaseException | None, context: grpc.aio.ServicerContext) -> None:
        if self._done:
            return
        self._done = True
        code = boundary.call_status(exc, context)
        self._m.grpc_handled.labels(*self._labels, code.name).inc()
        self._m.grpc_seconds.labels(*self._labels).observe(time.perf_counter() - self._t0)


class _CountingContext:
    """Forwards everything to the real servicer context, counting messages that a
    coroutine-style streaming handler reads or writes through it (grpc.health's Watch
    writes with context.write(), for one)."""

    def __init__(self, context: grpc.aio.ServicerContext, call: _Call) -> None:
        self._context = context
        self._call = call

    async def read(self) -> Any:
        msg = await self._context.read()
        if msg is not grpc.aio.EOF:
            self._call.received()
        return msg

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._call.sent()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _counted(iterator: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for message in iterator:
        call.received()
        yield message


class MetricsInterceptor(boundary.WrappingInterceptor):
    """Standard gRPC server metrics for grpc.aio, for all four RPC shapes. Plain
    (synchronous) handlers are passed through unmeasured (boundary.is_async)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service, name = split_method(method)
        # The method's declared shape: the guard serves every guarded method as a
        # request stream (to refuse before reading a body), which is no change for callers.
        kind = self.metrics.method_types.get((service, name)) or grpc_type(
            handler.request_streaming, handler.response_streaming
        )
        labels = (kind, service, name)
        m = self.metrics
        fn = boundary.behaviour(handler)
        if not boundary.is_async(fn):
            return handler
        request_streaming = handler.request_streaming
        response_streaming = handler.response_streaming

        def begin(request: Any, context: grpc.aio.ServicerContext) -> tuple[_Call, Any, Any]:
            call = _Call(m, labels)
            if request_streaming:
                request = _counted(request, call)
            else:
                call.received()
            return call, request, _CountingContext(context, call)

        if inspect.isasyncgenfunction(fn):

            async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call, request, proxy = begin(request, context)
                responses = fn(request, proxy)
                try:
                    async for item in responses:
                        call.sent()
                        yield item
                except BaseException as exc:
                    call.end(exc, context)
                    raise
                finally:
                    await responses.aclose()  # its cleanup runs now, not at GC
                call.end(None, context)

            return boundary.wrap_handler(handler, gen)

        async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, request, proxy = begin(request, context)
            try:
                response = await fn(request, proxy)
            except BaseException as exc:
                call.end(exc, context)
                raise
            # A streaming handler written as a coroutine sends through context.write().
            if response is not None and not response_streaming:
                call.sent()
            call.end(None, context)
            return response

        return boundary.wrap_handler(handler, coro)
