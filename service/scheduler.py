"""Dynamic batching between the RPC handlers and the model.

Handlers validate and preprocess their inputs, then submit work items here. One worker
thread takes items from a bounded queue and forms a batch: it waits at most `max_wait_s`
after the first item, or until `max_batch` faces are collected. The shared encoder runs
once over every face in the batch whatever its identity, then each decoder runs once over
its group (swap items and decode items alike). Results go back to each caller's future.

Why a thread, not the event loop: torch calls block for milliseconds to seconds. Why one
worker: a model call already uses every core (or the whole GPU); two would only contend.

Items whose caller gave up (deadline passed, call cancelled) are dropped before compute,
so a burst of abandoned calls does not delay the live ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch
from facemux.models.errors import FacemuxError, ResourceExhaustedError
from facemux.models.networks import Decoder
from torch import Tensor

log = logging.getLogger(__name__)


class DeadlineExpiredError(FacemuxError):
    """The caller's deadline passed while the item waited; it was never computed."""


class Op(Enum):
    ENCODE = "encode"  # faces -> latents
    SWAP = "swap"  # faces -> encoder -> decoder -> faces (+ masks)
    DECODE = "decode"  # latents -> decoder -> faces (+ masks)


@dataclass
class Result:
    latents: np.ndarray | None = None  # (N, C, H, W) float32 for ENCODE
    faces: np.ndarray | None = None  # (N, R, R, 3) uint8 for SWAP / DECODE
    masks: np.ndarray | None = None  # (N, R, R) uint8 when the decoder has a mask head
    finished: Any = None  # what the item's `finish` made of this result, when it has one


@dataclass
class Item:
    op: Op
    inputs: np.ndarray  # faces (N,R,R,3) uint8, or latents (N,C,H,W) float32 for DECODE
    decoder: Decoder | None
    deadline: float | None  # time.monotonic() seconds
    future: concurrent.futures.Future[Result] = field(default_factory=concurrent.futures.Future)
    # Host work on the result (encoding, provenance) done by the scheduler's finishing
    # thread before the future resolves, while the worker runs the next batch; its return
    # value is Result.finished. The items of a batch are finished together, in order, so
    # their callers all get their answers at about the same time and come back together.
    finish: Callable[[Result], Any] | None = None
    # One watermark payload per face: the faces come back marked, the whole batch's in one
    # pass where the model left them (on the GPU, before the copy to the host).
    marks: list[bytes] | None = None

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class BatchStats:
    faces: int
    items: int
    seconds: float


class ModelBackend(Protocol):
    """What the scheduler needs from the model (Runtime implements it)."""

    def encode_batch(self, faces: np.ndarray | Sequence[np.ndarray]) -> Tensor:
        """(N,R,R,3) uint8 RGB crops (or the parts of a batch, in order) -> latents on the
        device."""
        ...

    def decode_batch(
        self, decoder: Decoder, latents: Tensor, marks: Sequence[bytes | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Latents on the device -> (N,R,R,3) uint8 faces and (N,R,R) uint8 masks or None;
        faces with a watermark payload in `marks` come back marked."""
        ...

    def latents_to_device(self, latents: np.ndarray) -> Tensor: ...

    def latents_to_host(self, latents: Tensor) -> np.ndarray: ...


class Scheduler:
    def __init__(
        self,
        backend: ModelBackend,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queue_faces: int = 2048,
        batching: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_faces = max_queue_faces
        self.batching = batching
        self.on_batch = on_batch
        self._queue: deque[Item] = deque()
        self._queued_faces = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="facemux-batcher", daemon=True)
        self._finishing: queue.SimpleQueue[list[tuple[Item, Result]] | None] = queue.SimpleQueue()
        self._finisher = threading.Thread(target=self._finish, name="facemux-finisher", daemon=True)
        self._thread.start()
        self._finisher.start()

    # -- submission ------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Faces waiting (not yet taken into a batch)."""
        return self._queued_faces

    def submit(self, item: Item) -> concurrent.futures.Future[Result]:
        """Enqueue from any thread; the future resolves with the result or the error."""
        with self._cv:
            if self._stopping:
                raise ResourceExhaustedError("the server is shutting down; retry elsewhere")
            if self._queued_faces + item.size > self.max_queue_faces and self._queue:
                raise ResourceExhaustedError(
                    f"the model queue is full ({self._queued_faces} faces waiting, limit "
                    f"{self.max_queue_faces}); retry with backoff or send smaller batches"
                )
            self._queue.append(item)
            self._queued_faces += item.size
            self._cv.notify()
        return item.future

    async def run(self, item: Item) -> Result:
        """Submit and await from the event loop; cancelling the caller frees the slot."""
        fut = self.submit(item)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        self._finishing.put(None)
        self._finisher.join(timeout=30)

    # -- worker ----------------------------------------------------------------------------

    def _take_batch(self) -> list[Item]:
        """Block for the first item, then gather more until full or the wait is over."""
        with self._cv:
            while not self._queue and not self._stopping:
                self._cv.wait()
            if self._stopping and not self._queue:
                return []
            batch = [self._queue.popleft()]
            faces = batch[0].size
            if self.batching:
                give_up = time.monotonic() + self.max_wait_s
                while faces < self.max_batch:
                    if self._queue:
                        if faces + self._queue[0].size > self.max_batch:
                            break
                        nxt = self._queue.popleft()
                        batch.append(nxt)
                        faces += nxt.size
                        continue
                    left = give_up - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(timeout=left)
            self._queued_faces -= sum(i.size for i in batch)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if not item.future.set_running_or_notify_cancel():
                    continue  # the caller cancelled while waiting
                if item.deadline is not None and now > item.deadline:
                    item.future.set_exception(
                        DeadlineExpiredError("deadline passed while queued; not computed")
                    )
                    continue
                live.append(item)
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results = self._compute(live)
            except BaseException as exc:  # every caller learns what went wrong
                log.exception("model batch of %d items failed", len(live))
                for item in live:
                    item.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - t0
            to_finish = []
            for item, res in zip(live, results, strict=True):
                if item.finish is None:
                    item.future.set_result(res)
                else:
                    to_finish.append((item, res))
            if to_finish:
                self._finishing.put(to_finish)
            if self.on_batch is not None:
                self.on_batch(BatchStats(sum(i.size for i in live), len(live), seconds))

    def _finish(self) -> None:
        while (batch := self._finishing.get()) is not None:
            errors: list[BaseException | None] = []
            for item, res in batch:
                assert item.finish is not None
                try:
                    res.finished = item.finish(res)
                    errors.append(None)
                except BaseException as exc:  # the caller learns what went wrong
                    errors.append(exc)
            # Answered together, after the whole batch is finished: callers answered one by
            # one come back one by one, and the batch they form gives up waiting half full.
            for (item, res), error in zip(batch, errors, strict=True):
                if error is None:
                    item.future.set_result(res)
                else:
                    item.future.set_exception(error)

    def _compute(self, items: list[Item]) -> list[Result]:
        b = self.backend
        results = [Result() for _ in items]
        # 1. One encoder pass over every face that needs encoding, whatever its identity.
        enc_idx = [i for i, it in enumerate(items) if it.op in (Op.ENCODE, Op.SWAP)]
        latents: dict[int, Tensor] = {}
        if enc_idx:
            # The parts as they are: the backend gathers them with one copy.
            z = b.encode_batch([items[i].inputs for i in enc_idx])
            sizes = [items[i].size for i in enc_idx]
            for i, zi in zip(enc_idx, torch.split(z, sizes), strict=True):
                latents[i] = zi
                if items[i].op is Op.ENCODE:
                    results[i].latents = b.latents_to_host(zi)
        for i, it in enumerate(items):
            if it.op is Op.DECODE:
                latents[i] = b.latents_to_device(it.inputs)
        # 2. One decoder pass per identity over its group.
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            if it.op is not Op.ENCODE:
                assert it.decoder is not None
                groups.setdefault(id(it.decoder), []).append(i)
        for members in groups.values():
            decoder = items[members[0]].decoder
            assert decoder is not None
            parts = [latents[i] for i in members]
            z = parts[0] if len(parts) == 1 else torch.cat(parts)
            marks: list[bytes | None] | None = None
            if any(items[i].marks for i in members):
                marks = []
                for i in members:
                    given = items[i].marks
                    marks.extend([None] * items[i].size if given is None else given)
            faces, masks = b.decode_batch(decoder, z, marks)
            start = 0
            for i in members:
                n = items[i].size
                results[i].faces = faces[start : start + n]
                results[i].masks = None if masks is None else masks[start : start + n]
                start += n
        return results
