"""dlib's HOG face detector in worker processes.

dlib holds Python's GIL for the whole of a detection, so the server's threads detect one
frame at a time however many cores the machine has: on a 16-core GPU machine full-frame Swap
stalled at 1 / 41 ms = 24 frames/s with 16 clients (bench/RESULTS.md). Each worker process
here holds its own detector; frames reach it as the small gray image the detector reads
(640x360 bytes for a 1080p frame at the default max_side), and boxes come back.

Workers are spawned, never forked: the server's process runs gRPC's threads, and a fork
of it is unsafe. This module imports nothing heavy (no torch), so a worker starts in under a
second and holds 40-60 MB.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from numpy.typing import NDArray

# (left, top, right, bottom, score): dlib's inclusive pixel rectangle and its SVM score.
Rect = tuple[int, int, int, int, float]

_detector: Any = None


def _init_worker() -> None:
    global _detector
    import signal

    import dlib

    # A terminal's Ctrl-C reaches the whole process group: the server drains on it, and
    # its workers must keep detecting until it closes them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    _detector = dlib.get_frontal_face_detector()


def run_hog(detector: Any, gray: NDArray[Any], upsample: int, threshold: float) -> list[Rect]:
    """One dlib HOG detection as plain tuples (what crosses the process boundary)."""
    rects, scores, _ = detector.run(gray, upsample, threshold)
    return [
        (r.left(), r.top(), r.right(), r.bottom(), float(s))
        for r, s in zip(rects, scores, strict=True)
    ]


def _detect(gray: NDArray[Any], upsample: int, threshold: float) -> list[Rect]:
    return run_hog(_detector, gray, upsample, threshold)


def _ping() -> int:
    return 0


class PoolClosed(RuntimeError):
    """The pool was closed (the server is stopping) before or during this call."""


class HogPool:
    """``processes`` detector processes, started on first use (or by ``start``). Safe to
    call from many threads; each call blocks its thread only, without the GIL. A detection
    that takes longer than ``timeout_s`` (a hung worker) raises TimeoutError and the pool's
    processes are replaced."""

    def __init__(
        self, processes: int, timeout_s: float = 30.0, start_timeout_s: float = 60.0
    ) -> None:
        if processes < 1:
            raise ValueError(f"a pool needs at least one process, got {processes}")
        self.processes = processes
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._started: ProcessPoolExecutor | None = None
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise PoolClosed("the detector pool is closed")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_worker,
                )
            return self._pool

    def start(self, timeout: float | None = None) -> None:
        """Start every worker now, so the first frames do not wait for them."""
        self._started_pool(timeout)

    def _started_pool(self, timeout: float | None = None) -> ProcessPoolExecutor:
        pool = self._executor()
        self._ensure_started(pool, timeout)
        return pool

    def _ensure_started(self, pool: ProcessPoolExecutor, timeout: float | None = None) -> None:
        # A spawned worker takes a while to start (longer on a busy machine); that time must
        # not count against ``timeout_s``, which is there to catch a hung detection.
        if self._started is not pool:
            wait_s = self.start_timeout_s if timeout is None else timeout
            for f in [pool.submit(_ping) for _ in range(self.processes)]:
                f.result(timeout=wait_s)
            self._started = pool

    def detect(self, gray: NDArray[Any], upsample: int, threshold: float) -> list[Rect]:
        for attempt in range(2):
            pool = self._executor()
            try:
                self._ensure_started(pool)
                return pool.submit(_detect, gray, upsample, threshold).result(self.timeout_s)
            except BrokenProcessPool:
                # A worker died (killed, out of memory): the pool is unusable from then on.
                # Start a fresh one once; a second death in a row is reported.
                self._discard(pool)
                if attempt:
                    raise
            except FutureTimeout as exc:  # not the builtin TimeoutError before Python 3.11
                self._discard(pool)
                raise TimeoutError(
                    f"no answer from a detector process in {self.timeout_s} s"
                ) from exc
            except (CancelledError, RuntimeError) as exc:
                if self._closed:  # closed under this call: shutdown cancels and refuses
                    raise PoolClosed("the detector pool is closed") from exc
                raise
        raise AssertionError("unreachable")

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Drop a broken or hung pool and end its processes without waiting on them."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        _terminate(pool)

    def pids(self) -> list[int]:
        """The live workers' process ids (for tests and diagnostics)."""
        with self._lock:
            procs = getattr(self._pool, "_processes", None) or {}
            return [p.pid for p in procs.values() if p.is_alive()]

    def close(self, wait: bool = True) -> None:
        """Stop the workers; ``wait=False`` terminates them instead of letting them finish."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        if wait:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            _terminate(pool)


def _terminate(pool: ProcessPoolExecutor) -> None:
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()  # a hung or stopped worker ignores SIGTERM
