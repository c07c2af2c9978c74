"""The instruments of one server: gRPC, facemux's own and build info, in one registry."""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

import grpc
from facemux.service.metrics.collectors import GpuCollector, StateCollector
from facemux.service.metrics.interceptor import MetricsInterceptor
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

if TYPE_CHECKING:
    from facemux.service.runtime import Runtime
    from facemux.service.store import Store


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


class BatchStatsLike(Protocol):
    faces: int
    items: int
    seconds: float
    queue_waits: tuple[float, ...]


class DetectionStatsLike(Protocol):
    frames: int
    seconds: float


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

    def __init__(
        self, max_identities: int = 100, max_batch: int = 32, max_detector_batch: int = 16
    ) -> None:
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
        self._host_reads = Counter(
            "facemux_frame_host_reads_frames",
            "Full frames on the tensor pixel path whose pixels a host model read (dlib "
            "landmarks, a host detector, seamless blending), by whether that read had to copy "
            "the frame from the device (copied) or found it decoded on the host.",
            ["source"],
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
        self.detector_batch = Histogram(
            "facemux_detector_batch_frames",
            "Frames per detection batch formed by the detector's batcher (blazeface with "
            "detector_batching): frames of concurrent calls detected in one network pass.",
            buckets=batch_buckets(max_detector_batch),
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

    def frame_host_read(self, copied: bool) -> None:
        self._host_reads.labels("copied" if copied else "host").inc()

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

    def observe_detection(self, stats: DetectionStatsLike) -> None:
        """The detector batcher's on_batch callback (runs on its worker thread)."""
        self.detector_batch.observe(stats.frames)
        self.stage_seconds.labels("detect_batch").observe(stats.seconds)

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
