"""Batched face detection across concurrent frames: the detector's micro-batcher.

A torch detector (BlazeFace) costs little more for eight frames than for one, on a GPU and
to a lesser degree on CPU cores, so frames of concurrent calls (Swap calls, SwapStreams)
are detected together. Each caller prepares its own frame in its own thread (upload,
letterbox and tiles: per-frame work that runs in parallel), then submits it here; one
worker thread stacks the prepared frames of every waiting caller into one network pass and
decodes anchors and suppresses overlaps for all of them at once on the device. Each caller
gets its own frame's faces back and builds its landmarks in its own thread.

When a batch closes, as in the model's scheduler (service/scheduler.py): at
`max_frames`; at once when no more frames are known to be on their way; otherwise when no
frame has arrived for `max_wait_s`. Frames on their way are announced with `expect()` by
calls that will detect (entered before the frame is decoded). A lone frame never waits:
when it arrives nothing else is announced. Under load batches form by themselves too:
frames that arrive while a batch runs are taken together by the next one. A frame that
arrives when nothing runs, waits or is announced is detected at once in its caller's own
thread, with no hand-off to the worker and back.

A caller whose deadline passes stops waiting and its frame is dropped before compute; a
call cancelled by its client (service/cancel.py) likewise. When a batch fails, its frames
are detected again one at a time, so an error reaches only the caller whose frame caused
it.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch
from facemux.models.errors import DeadlineExpiredError, UnavailableError
from facemux.models.faces import DetectedFace
from facemux.service.cancel import on_cancel
from numpy.typing import NDArray

log = logging.getLogger(__name__)

__all__ = ["BatchDetector", "DetectionBatcher", "DetectionStats", "detection_deadline"]

P = TypeVar("P")  # a prepared frame
C = TypeVar("C")  # one frame's raw detections


class BatchDetector(Protocol[P, C]):
    """What the batcher needs from a detector (BlazeFaceDetector implements it)."""

    def prepare(self, rgb: NDArray[np.uint8] | torch.Tensor) -> P:
        """One frame's network input on the device (the caller's thread; raises on a bad
        frame)."""
        ...

    def detect_prepared(self, prepared: Sequence[P]) -> list[C]:
        """One pass over all frames (the worker thread)."""
        ...

    def faces(self, found: C) -> list[DetectedFace]:
        """One frame's detections as faces (the caller's thread)."""
        ...


@dataclass
class DetectionStats:
    frames: int
    seconds: float
    # Per computed frame: seconds from submit until its batch started.
    queue_waits: tuple[float, ...] = ()


@dataclass
class _Frame(Generic[P, C]):
    prepared: P
    deadline: float | None  # time.monotonic() seconds
    submitted_at: float
    future: concurrent.futures.Future[C] = field(default_factory=concurrent.futures.Future)


class _Announcement:
    def __init__(self) -> None:
        self.open = True


# The call's deadline (time.monotonic() seconds), set by the frame pipeline around its
# detection: the Detector interface (detect(rgb)) has no room for it.
detection_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "facemux_detection_deadline", default=None
)
_announced: contextvars.ContextVar[_Announcement | None] = contextvars.ContextVar(
    "facemux_detection_announced", default=None
)


class DetectionBatcher(Generic[P, C]):
    """Wraps a batch detector behind the one-frame ``Detector`` interface (``detect``), so
    the face pipeline and the stream tracker use it unchanged."""

    @property
    def accepts_device_frames(self) -> bool:
        """detect() takes a frame already on the device when the detector's prepare does."""
        return bool(getattr(self.detector, "accepts_device_frames", False))

    def __init__(
        self,
        detector: BatchDetector[P, C],
        max_frames: int = 16,
        max_wait_s: float = 0.002,
        on_batch: Callable[[DetectionStats], None] | None = None,
        start: bool = True,
    ) -> None:
        """`start=False` leaves the worker loop to the caller (`step()`): tests drive it."""
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.detector = detector
        self.max_frames = int(max_frames)
        self.max_wait_s = float(max_wait_s)
        self.on_batch = on_batch
        self._queue: deque[_Frame[P, C]] = deque()
        self._announced = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._busy = False  # a batch is running (the worker's or a lone caller's own)
        self._gathering = False  # the worker waits for announced frames
        self._started = start
        self._thread = threading.Thread(target=self._run, name="facemux-detector", daemon=True)
        if start:
            self._thread.start()

    # -- callers ---------------------------------------------------------------------------

    @contextmanager
    def expect(self) -> Iterator[None]:
        """Announce a frame this thread will detect: enter it before the frame is decoded.
        A batch forming meanwhile waits for it (never more than `max_wait_s` without an
        arrival); leaving the block withdraws it if it was not submitted."""
        ann = _Announcement()
        with self._cv:
            self._announced += 1
        token = _announced.set(ann)
        try:
            yield
        finally:
            _announced.reset(token)
            self._withdraw(ann)

    def _withdraw(self, ann: _Announcement) -> None:
        with self._cv:
            if ann.open:
                ann.open = False
                self._announced -= 1
                if self._gathering:  # the worker waits for this frame: it need not now
                    self._cv.notify()

    def submit(self, prepared: P, deadline: float | None = None) -> concurrent.futures.Future[C]:
        ann = _announced.get()
        with self._cv:
            if ann is not None and ann.open:
                ann.open = False
                self._announced -= 1
            if self._stopping:
                raise UnavailableError("the server is shutting down; retry on another")
            item: _Frame[P, C] = _Frame(prepared, deadline, time.monotonic())
            self._queue.append(item)
            self._cv.notify()
        return item.future

    def _run_alone(self) -> bool:
        """Whether this caller's frame runs at once in its own thread: nothing runs, nothing
        waits and no other frame is announced. It then pays no hand-off to the worker and
        back (on a loaded machine each wake-up can cost a scheduling slice); frames arriving
        meanwhile queue for the worker as usual."""
        ann = _announced.get()
        with self._cv:
            if ann is not None and ann.open:
                ann.open = False
                self._announced -= 1
            alone = (
                self._started
                and not self._busy
                and not self._queue
                and not self._announced
                and not self._stopping
            )
            if alone:
                self._busy = True
            return alone

    def detect(self, rgb: NDArray[np.uint8] | torch.Tensor) -> list[DetectedFace]:
        """Faces in one frame, detected in a batch with whatever other frames are waiting.
        Honours the call's deadline (``detection_deadline``) and cancellation."""
        deadline = detection_deadline.get()
        prepared = self.detector.prepare(rgb)  # a bad frame fails here, alone
        if self._run_alone():
            try:
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlineExpiredError("deadline passed before face detection")
                t0 = time.perf_counter()
                found = self.detector.detect_prepared([prepared])[0]
                if self.on_batch is not None:
                    self.on_batch(DetectionStats(1, time.perf_counter() - t0, (0.0,)))
            finally:
                with self._cv:
                    self._busy = False
                    # Only when the worker has something to do: waking it for nothing costs
                    # the caller a GIL hand-off (3.5 ms a frame on the loaded 2-core machine).
                    if self._queue or self._stopping:
                        self._cv.notify_all()
            return self.detector.faces(found)
        future = self.submit(prepared, deadline)
        on_cancel(future.cancel)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            found = future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()  # dropped before compute if its batch has not started
            raise DeadlineExpiredError("deadline passed while waiting for face detection") from None
        return self.detector.faces(found)

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()

    # -- worker ----------------------------------------------------------------------------

    def _take_batch(self) -> list[_Frame[P, C]]:
        with self._cv:
            while (not self._queue or self._busy) and not self._stopping:
                self._cv.wait()
            while self._busy:  # stopping: let a lone caller's batch finish first
                self._cv.wait()
            if not self._queue:
                return []
            self._busy = True
            batch = [self._queue.popleft()]
            last = batch[0].submitted_at
            deadlines = [batch[0].deadline] if batch[0].deadline is not None else []
            while len(batch) < self.max_frames:
                if self._queue:
                    nxt = self._queue.popleft()
                    batch.append(nxt)
                    last = max(last, nxt.submitted_at)
                    if nxt.deadline is not None:
                        deadlines.append(nxt.deadline)
                    continue
                if not self._announced or self._stopping:
                    break  # nothing on its way: waiting would only add latency
                give_up = last + self.max_wait_s
                if deadlines:
                    give_up = min(give_up, min(deadlines))
                left = give_up - time.monotonic()
                if left <= 0:
                    break
                self._gathering = True
                self._cv.wait(left)
                self._gathering = False
            return batch

    def _run(self) -> None:
        while self.step():
            pass

    def step(self) -> bool:
        """Form one batch, detect it and answer its callers; False once stopped."""
        batch = self._take_batch()
        if not batch:
            return False
        try:
            self._run_batch(batch)
        finally:
            with self._cv:
                self._busy = False
        return True

    def _run_batch(self, batch: list[_Frame[P, C]]) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller gave up or its call was cancelled
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExpiredError("deadline passed while queued for face detection")
                )
                continue
            live.append(item)
        if not live:
            return
        waits = tuple(now - i.submitted_at for i in live)
        t0 = time.perf_counter()
        try:
            results = self.detector.detect_prepared([i.prepared for i in live])
        except BaseException as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
            else:
                # One frame's trouble must not fail the others: each alone, so the error
                # reaches its own caller.
                log.warning("detection batch of %d frames failed (%s); one by one", len(live), exc)
                for item in live:
                    try:
                        item.future.set_result(self.detector.detect_prepared([item.prepared])[0])
                    except BaseException as one:
                        item.future.set_exception(one)
            results = None
        if results is not None:
            for item, res in zip(live, results, strict=True):
                item.future.set_result(res)
        if self.on_batch is not None:
            self.on_batch(DetectionStats(len(live), time.perf_counter() - t0, waits))
