"""Scrape-time collectors: state read when Prometheus asks (the runtime, the store, the
scheduler queue), and the GPU through NVML."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from facemux.service.runtime import Runtime
    from facemux.service.store import Store

log = logging.getLogger(__name__)


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
        yield GaugeMetricFamily(
            "facemux_queue_depth",
            "Faces waiting in the scheduler queue for a model batch.",
            value=float(self.queue_depth()),
        )

    def _runtime(self) -> Iterator[Metric]:
        rt = self.runtime
        if rt is None:
            return
        count, nbytes = _cache_totals(rt)
        yield GaugeMetricFamily(
            "facemux_resident_decoders",
            "Identity decoders resident on the device (LRU).",
            value=float(count),
        )
        yield GaugeMetricFamily(
            "facemux_resident_decoder_bytes",
            "Bytes of parameters of the resident decoders.",
            value=float(nbytes),
        )
        yield GaugeMetricFamily(
            "facemux_decoder_cache_max_decoders",
            "Most decoders the LRU keeps resident (setting decoder_cache_count).",
            value=float(rt.cache.max_count),
        )
        if rt.ready and rt.config is not None:
            yield GaugeMetricFamily(
                "facemux_model_load_seconds",
                "Time the served encoder took to load.",
                value=float(rt.load_seconds),
            )
            if rt.compute_threads:
                yield GaugeMetricFamily(
                    "facemux_batch_threads",
                    "Intra-op threads of the thread that runs the model's batches (setting "
                    "torch_threads); the server's other threads compute on one.",
                    value=float(rt.compute_threads),
                )
            if rt.buckets:
                yield CounterMetricFamily(
                    "facemux_batch_padding_faces",
                    "Blank rows the model ran to fill batches up to their bucket (setting "
                    "batch_buckets).",
                    value=float(rt.padded_faces),
                )
            info = GaugeMetricFamily(
                "facemux_model_info",
                "Always 1 once the encoder is loaded; the labels describe it.",
                labels=("preset", "resolution", "encoder", "device", "layout"),
            )
            info.add_metric(
                [
                    rt.config.name,
                    str(rt.config.resolution),
                    rt.fingerprint[:16],
                    str(rt.device),
                    rt.layout,
                ],
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
        yield GaugeMetricFamily(
            "facemux_identities", "Identities registered in the store.", value=float(n)
        )

    def _identity_count(self) -> int:
        with self._lock:
            now = time.monotonic()
            if self._identities is not None and now - self._identities[0] < self.IDENTITY_TTL_S:
                return self._identities[1]
            n = count_identities(self.store)
            self._identities = (now, n)
            return n


def count_identities(store: Store | None) -> int:
    return 0 if store is None else store.count_identities()


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
