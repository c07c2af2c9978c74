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

from facemux.service.metrics.collectors import GpuCollector, StateCollector
from facemux.service.metrics.exposition import MetricsServer
from facemux.service.metrics.instruments import (
    GPU_METRICS,
    OTHER_IDENTITY,
    Metrics,
    StageClock,
)
from facemux.service.metrics.interceptor import MetricsInterceptor, grpc_type, split_method

__all__ = [
    "GPU_METRICS",
    "OTHER_IDENTITY",
    "GpuCollector",
    "Metrics",
    "MetricsInterceptor",
    "MetricsServer",
    "StageClock",
    "StateCollector",
    "grpc_type",
    "split_method",
]
