"""Prometheus metrics: the standard gRPC server metrics, facemux's own, and the GPU's.

Each `App` owns one `Metrics` with its own `CollectorRegistry` (never the process-global
one), so several servers can live in one process (tests, benchmarks) without clashing.
The registry is exposed over plain HTTP on `metrics_port` (see `MetricsServer`).

Three kinds of sources:

* instruments updated as work happens: the gRPC interceptor (`MetricsInterceptor`), the
  servicer (`faces_swapped`, `frames_swapped`, `stage_clock`), the batching scheduler
  (`observe_batch`), the server (`set_serving`) and, later, the training service
  (`set_training_jobs`, `training_progress`);
* collectors that read state at scrape time (resident decoders, identities, queue depth,
  model load time), so nothing has to remember to update a gauge and the runtime and the
  store need no metrics code;
* the GPU via NVML, only when one is present: without one the GPU series are absent (not
  zero), which is what dashboards and alerts expect from "no GPU here".

Label cardinality: every label here has a small, bounded set of values (gRPC methods and
codes, pipeline stages, job states, GPU indices) except `identity` on
`facemux_faces_swapped_total`. Identities are user data, so only the first
`metrics_max_identities` distinct identities seen by a process get their own series; the
rest are counted under `identity="(other)"`, a value no identity can take (names cannot
contain parentheses). Set `metrics_max_identities=0` to count everything there.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import platform
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from facemux.service import boundary
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from facemux.service.runtime import Runtime
    from facemux.service.store import Store

log = logging.getLogger(__name__)

# prometheus-client also exposes a `<name>_created` timestamp series beside every counter and
# histogram; Prometheus stores each as one more series, and nothing here reads them. (The
# switch is process-wide: facemux owns the process it serves from.)
disable_created_metrics()

# Latency buckets span a cache-hot tiny-model call (~1 ms) to a cold decoder load on a big
# batch (tens of seconds).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


# Faces per model batch: every size up to the configured largest batch (so a mean of 5.1
# against a maximum of 8 shows which sizes occur), then powers of two for larger requests.
def batch_buckets(max_batch: int) -> tuple[float, ...]:
    exact = range(1, max(1, min(max_batch, 64)) + 1)
    above = (2**k for k in range(7, 12) if 2**k > max_batch)
    return (*map(float, exact), *map(float, above))


# Seconds an item waits in the scheduler queue before its batch starts: from nothing (a
# lone caller) through the batch wait (milliseconds) to a backlog behind busy batches.
QUEUE_WAIT_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
OTHER_IDENTITY = "(other)"
TRAINING_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
# Stages of an aligned-crop swap as one request sees them (servicer), plus one model batch
# (scheduler). Other pipelines (full frames) observe stage names of their own.
STAGES = ("preprocess", "queue_and_model", "postprocess", "model_batch")

# Series that exist only on a host with an NVIDIA GPU (dashboards may use them; tests
# accept their absence on a CPU host).
GPU_METRICS = (
    "facemux_gpu_utilization_ratio",
    "facemux_gpu_memory_used_bytes",
    "facemux_gpu_memory_total_bytes",
    "facemux_gpu_power_watts",
)


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


class BatchStatsLike(Protocol):
    faces: int
    items: int
    seconds: float
    queue_waits: tuple[float, ...]


class StageClock:
    """Times consecutive stages of one request: `lap(stage)` observes the time since the
    previous lap (or since the clock was made). Keeps call sites to one line per stage."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self._histogram.labels(stage).observe(now - self._last)
        self._last = now


class Metrics:
    """All instruments of one server; cheap to create (tests and the servicer's default)."""

    def __init__(self, max_identities: int = 100, max_batch: int = 32) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.max_identities = max_identities
        # (service, method) -> grpc_type, from the service descriptors (init_grpc_methods).
        self.method_types: dict[tuple[str, str], str] = {}
        self._identities_seen: set[str] = set()
        self._identities_lock = threading.Lock()
        self.gpu: GpuCollector | None = None

        # -- gRPC, as go-grpc-prometheus / py-grpc-prometheus name them --------------------
        self.grpc_started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status code.",
            (*GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its handler finishing (whole stream for "
            "streaming RPCs).",
            GRPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.grpc_received = Counter(
            "grpc_server_msg_received",
            "Request messages received (1 per unary request).",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_sent = Counter(
            "grpc_server_msg_sent",
            "Response messages sent (1 per successful unary response).",
            GRPC_LABELS,
            registry=r,
        )

        # -- facemux ---------------------------------------------------------------------
        self._faces = Counter(
            "facemux_faces_swapped",
            "Faces drawn as an identity (Swap, SwapStream, Decode). Identities beyond "
            'metrics_max_identities are counted under identity="(other)".',
            ("identity",),
            registry=r,
        )
        self._frames = Counter(
            "facemux_frames_swapped",
            "Frames answered with a swapped face on SwapStream.",
            registry=r,
        )
        self._codec = Counter(
            "facemux_frame_codec_frames",
            "Full frames decoded and encoded, by codec: nvjpeg on the GPU or host (OpenCV).",
            ["op", "codec"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "facemux_stage_seconds",
            "Time per pipeline stage. Aligned crops, per request: preprocess (validate, "
            "decode images, resolve the identity), queue_and_model (wait for and run the "
            "model batch), postprocess (encode output images); per scheduler batch: "
            "model_batch. Full frames add their own stages (detect, align, blend, ...).",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "facemux_batch_size",
            "Faces per model batch formed by the scheduler (one bucket per size up to the "
            "configured largest batch).",
            buckets=batch_buckets(max_batch),
            registry=r,
        )
        self.queue_wait = Histogram(
            "facemux_queue_wait_seconds",
            "Seconds each item waited in the scheduler queue before its model batch started "
            "(the batch wait plus any backlog; excludes the model time).",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self._serving = Gauge(
            "facemux_serving",
            "1 while health answers SERVING (encoder loaded, not draining), else 0.",
            registry=r,
        )
        self._training_jobs = Gauge(
            "facemux_training_jobs",
            "Training jobs known to this server, by state.",
            ("state",),
            registry=r,
        )
        self._training_rate = Gauge(
            "facemux_training_examples_per_second",
            "Training throughput summed over this server's running jobs.",
            registry=r,
        )
        self._training_loss = Gauge(
            "facemux_training_loss",
            "Latest training loss, averaged over this server's running jobs.",
            registry=r,
        )
        self._training: dict[str, tuple[float, float]] = {}
        self._training_lock = threading.Lock()
        build = Gauge(
            "facemux_build_info",
            "Always 1; the labels say what is running.",
            ("version", "python_version", "grpc_version", "torch_version"),
            registry=r,
        )
        build.labels(*_versions()).set(1)

        # Zero-valued series from the start, so rate() and dashboards see them before the
        # first event rather than "no data".
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for state in TRAINING_STATES:
            self._training_jobs.labels(state).set(0)

    # -- API for the servicer, scheduler and server ----------------------------------------

    def faces_swapped(self, identity: str, n: int) -> None:
        if n > 0:
            self._faces.labels(self._identity_label(identity)).inc(n)

    def frames_swapped(self, n: int = 1) -> None:
        if n > 0:
            self._frames.inc(n)

    def frame_codec(self, op: str, codec: str) -> None:
        self._codec.labels(op, codec).inc()

    def stage_clock(self) -> StageClock:
        return StageClock(self.stage_seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def observe_batch(self, stats: BatchStatsLike) -> None:
        """The scheduler's on_batch callback (runs on its worker thread)."""
        self.batch_size.observe(stats.faces)
        self.stage_seconds.labels("model_batch").observe(stats.seconds)
        for wait in stats.queue_waits:
            self.queue_wait.observe(wait)

    def set_serving(self, serving: bool) -> None:
        self._serving.set(1 if serving else 0)

    def set_training_jobs(self, counts: Mapping[str, int]) -> None:
        """Jobs by state; states not named are set to 0."""
        for state in {*TRAINING_STATES, *counts}:
            self._training_jobs.labels(state).set(counts.get(state, 0))

    def training_progress(self, job_id: str, examples_per_second: float, loss: float) -> None:
        """A running job's latest step. Per-job values are folded into two unlabelled
        gauges so that job ids (unbounded) never become label values."""
        with self._training_lock:
            self._training[job_id] = (examples_per_second, loss)
            self._publish_training()

    def training_finished(self, job_id: str) -> None:
        with self._training_lock:
            self._training.pop(job_id, None)
            self._publish_training()

    def _publish_training(self) -> None:
        values = list(self._training.values())
        self._training_rate.set(sum(v[0] for v in values))
        self._training_loss.set(sum(v[1] for v in values) / len(values) if values else 0.0)

    def _identity_label(self, identity: str) -> str:
        with self._identities_lock:
            if identity in self._identities_seen:
                return identity
            if len(self._identities_seen) < self.max_identities:
                self._identities_seen.add(identity)
                return identity
        return OTHER_IDENTITY

    # -- wiring ----------------------------------------------------------------------------

    def init_grpc_methods(self, methods: Iterable[tuple[str, str, str]]) -> None:
        """Create the zero series of (grpc_type, service, method) so that a method nobody
        called yet reads 0 rather than 'no data'."""
        for labels in methods:
            self.method_types[labels[1], labels[2]] = labels[0]
            self.grpc_started.labels(*labels)
            self.grpc_received.labels(*labels)
            self.grpc_sent.labels(*labels)
            self.grpc_seconds.labels(*labels)
            self.grpc_handled.labels(*labels, grpc.StatusCode.OK.name)

    def attach(
        self,
        runtime: Runtime | None = None,
        store: Store | None = None,
        queue_depth: Callable[[], int] | None = None,
        gpu: bool = True,
    ) -> None:
        """Register the scrape-time collectors over the server's runtime, store and
        scheduler queue, and the GPU collector when NVML finds a GPU."""
        self.registry.register(StateCollector(runtime, store, queue_depth))
        if gpu and self.gpu is None:
            self.gpu = GpuCollector.create()
            if self.gpu is not None:
                self.registry.register(self.gpu)

    def interceptor(self) -> MetricsInterceptor:
        return MetricsInterceptor(self)

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
            self.gpu = None


def _versions() -> tuple[str, str, str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from facemux.service import __version__

    def dist(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    return __version__, platform.python_version(), grpc.__version__, dist("torch")


# -- scrape-time collectors ----------------------------------------------------------------


class StateCollector(Collector):
    """Reads the runtime, store and scheduler when Prometheus scrapes (on the HTTP
    server's thread). Each source is optional; a failing read drops that one series."""

    IDENTITY_TTL_S = 10.0  # a scrape storm must not turn into a store-listing storm

    def __init__(
        self,
        runtime: Runtime | None,
        store: Store | None,
        queue_depth: Callable[[], int] | None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.queue_depth = queue_depth
        self._identities: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        yield from self._queue()
        yield from self._runtime()
        yield from self._store()

    def _queue(self) -> Iterator[Metric]:
        if self.queue_depth is None:
            return
        g = GaugeMetricFamily(
            "facemux_queue_depth", "Faces waiting in the scheduler queue for a model batch."
        )
        g.add_metric([], float(self.queue_depth()))
        yield g

    def _runtime(self) -> Iterator[Metric]:
        rt = self.runtime
        if rt is None:
            return
        count, nbytes = _cache_totals(rt)
        g = GaugeMetricFamily(
            "facemux_resident_decoders", "Identity decoders resident on the device (LRU)."
        )
        g.add_metric([], float(count))
        yield g
        g = GaugeMetricFamily(
            "facemux_resident_decoder_bytes", "Bytes of parameters of the resident decoders."
        )
        g.add_metric([], float(nbytes))
        yield g
        g = GaugeMetricFamily(
            "facemux_decoder_cache_max_decoders",
            "Most decoders the LRU keeps resident (setting decoder_cache_count).",
        )
        g.add_metric([], float(rt.cache.max_count))
        yield g
        if rt.ready and rt.config is not None:
            g = GaugeMetricFamily(
                "facemux_model_load_seconds", "Time the served encoder took to load."
            )
            g.add_metric([], float(rt.load_seconds))
            yield g
            info = GaugeMetricFamily(
                "facemux_model_info",
                "Always 1 once the encoder is loaded; the labels describe it.",
                labels=("preset", "resolution", "encoder", "device"),
            )
            info.add_metric(
                [rt.config.name, str(rt.config.resolution), rt.fingerprint[:16], str(rt.device)],
                1.0,
            )
            yield info

    def _store(self) -> Iterator[Metric]:
        if self.store is None:
            return
        try:
            n = self._identity_count()
        except OSError:
            log.warning("could not count identities in the store", exc_info=True)
            return
        g = GaugeMetricFamily("facemux_identities", "Identities registered in the store.")
        g.add_metric([], float(n))
        yield g

    def _identity_count(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._identities is not None and now - self._identities[0] < self.IDENTITY_TTL_S:
                return self._identities[1]
            n = count_identities(self.store)
            self._identities = (now, n)
            return n


def count_identities(store: Store | None) -> int:
    """Cheap for the local store: one directory listing, no JSON parsed."""
    from facemux.service.store import LocalStore

    if store is None:
        return 0
    if isinstance(store, LocalStore):
        root = store.root / "identities"
        if not root.is_dir():
            return 0
        return sum(
            1
            for d in root.iterdir()
            if not d.name.startswith(".") and (d / "identity.json").is_file()
        )
    return len(store.list_identities())


def _cache_totals(rt: Runtime) -> tuple[int, int]:
    cache = rt.cache
    # total_bytes() walks the LRU without its lock; a decoder load racing the walk makes
    # the dict change size under it. Retry a few times rather than reach into the cache.
    for _ in range(5):
        try:
            return len(cache.resident()), int(cache.total_bytes())
        except RuntimeError:
            continue
    return len(cache.resident()), 0


class GpuCollector(Collector):
    """NVIDIA GPUs through NVML (package nvidia-ml-py). `create()` answers None where
    there is no NVIDIA driver or GPU, so the GPU series are simply absent there."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    @classmethod
    def create(cls, nvml: Any = None) -> GpuCollector | None:
        if nvml is None:
            try:
                import pynvml  # from nvidia-ml-py
            except ImportError:
                log.info("nvidia-ml-py is not installed: no GPU metrics")
                return None
            nvml = pynvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.info("no NVIDIA GPU found (%s): no GPU metrics", exc)
            return None
        if count == 0:
            nvml.nvmlShutdown()
            return None
        return cls(nvml)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()

    def collect(self) -> Iterator[Metric]:
        nv = self.nvml
        labels = ("gpu", "uuid", "model")
        util = GaugeMetricFamily(
            "facemux_gpu_utilization_ratio",
            "Fraction of the last sample period in which a kernel ran on the GPU (0-1).",
            labels=labels,
        )
        used = GaugeMetricFamily(
            "facemux_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=labels
        )
        total = GaugeMetricFamily(
            "facemux_gpu_memory_total_bytes", "GPU memory installed.", labels=labels
        )
        power = GaugeMetricFamily("facemux_gpu_power_watts", "GPU power draw.", labels=labels)
        try:
            count = nv.nvmlDeviceGetCount()
        except Exception:
            log.warning("NVML stopped answering", exc_info=True)
            return
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                values = [str(i), _text(nv.nvmlDeviceGetUUID(h)), _text(nv.nvmlDeviceGetName(h))]
            except Exception:
                continue
            # Each reading on its own: some boards do not report power, say.
            for family, read in (
                (util, lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                (used, lambda h=h: nv.nvmlDeviceGetMemoryInfo(h).used),
                (total, lambda h=h: nv.nvmlDeviceGetMemoryInfo(h).total),
                (power, lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    family.add_metric(values, float(read()))
                except Exception:
                    continue
        for family in (util, used, total, power):
            if family.samples:
                yield family


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- gRPC interceptor ----------------------------------------------------------------------


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


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Standard gRPC server metrics for grpc.aio, for all four RPC shapes. Plain
    (synchronous) handlers are passed through unmeasured (boundary.is_async)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        service, method = split_method(handler_call_details.method)
        # The method's declared shape: the guard serves every guarded method as a
        # request stream (to refuse before reading a body), which is no change for callers.
        kind = self.metrics.method_types.get((service, method)) or grpc_type(
            handler.request_streaming, handler.response_streaming
        )
        labels = (kind, service, method)
        return self._wrap(handler, labels)

    def _wrap(
        self, handler: grpc.RpcMethodHandler, labels: tuple[str, str, str]
    ) -> grpc.RpcMethodHandler:
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


# -- HTTP exposition -----------------------------------------------------------------------


class MetricsServer:
    """/metrics over HTTP on its own port and thread (prometheus-client's WSGI server),
    so a scrape never waits on the gRPC event loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._httpd: WSGIServer
        self._thread: threading.Thread
        addr = host.strip("[]") or "0.0.0.0"
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=registry)
        self.port = int(self._httpd.server_port)
        self.host = addr

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
