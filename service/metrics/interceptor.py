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


class _Series:
    """One method's series, looked up once (a labels() lookup takes a lock and hashes the
    label values: several per call, for values fixed per method)."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.started = metrics.grpc_started.labels(*labels)
        self.received = metrics.grpc_received.labels(*labels)
        self.sent = metrics.grpc_sent.labels(*labels)
        self.seconds = metrics.grpc_seconds.labels(*labels)
        self._handled: dict[grpc.StatusCode, Any] = {}

    def handled(self, code: grpc.StatusCode) -> Any:
        series = self._handled.get(code)
        if series is None:
            series = self._handled[code] = self.metrics.grpc_handled.labels(*self.labels, code.name)
        return series


class _Call:
    """Bookkeeping of one RPC."""

    __slots__ = ("_done", "_s", "_t0")

    def __init__(self, series: _Series) -> None:
        self._s = series
        self._t0 = time.perf_counter()
        self._done = False
        series.started.inc()

    def received(self) -> None:
        self._s.received.inc()

    def sent(self) -> None:
        self._s.sent.inc()

    def end(self, exc: BaseException | None, context: grpc.aio.ServicerContext) -> None:
        if self._done:
            return
        self._done = True
        code = boundary.call_status(exc, context)
        self._s.handled(code).inc()
        self._s.seconds.observe(time.perf_counter() - self._t0)


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
        super().__init__()
        self.metrics = metrics

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service, name = split_method(method)
        # The method's declared shape: the guard serves every guarded method as a
        # request stream (to refuse before reading a body), which is no change for callers.
        kind = self.metrics.method_types.get((service, name)) or grpc_type(
            handler.request_streaming, handler.response_streaming
        )
        series = _Series(self.metrics, (kind, service, name))
        fn = boundary.behaviour(handler)
        if not boundary.is_async(fn):
            return handler
        request_streaming = handler.request_streaming
        response_streaming = handler.response_streaming

        def begin(request: Any, context: grpc.aio.ServicerContext) -> tuple[_Call, Any, Any]:
            call = _Call(series)
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
