"""Dynamic batching between the RPC handlers and the model.

Handlers validate and preprocess their inputs, then submit work items here. One worker
thread takes items from a bounded queue and forms a batch. The shared encoder runs once over
every face in the batch whatever its identity, then each decoder runs once over its group
(swap items and decode items alike). Results go back to each caller's future.

When a batch closes (docs/ARCHITECTURE.md, "Batching policy"): at `max_batch` faces; at
once when no more work is known to be on its way; otherwise when no item has arrived for
`max_wait_s` (counted from the later of the batch's first item, its latest arrival and, for
returning work, the time it is due back). Work on its way is of two kinds, counted in
faces or callers: announced work (a handler entered `expect(n)` and is still
preprocessing) and returning work (callers answered by earlier batches that have not
submitted again).
Callers answered together come back spread over the response and request paths, and the
first of them only after a round trip; the scheduler learns that round trip and waits for
the convoy, so it is not cut into two batches that then alternate forever. Returning work
not back `max_wait_s` after it was due no longer holds batches (the caller left or pauses
between calls), so it delays one batch at most. A lone caller never waits: when its item
arrives nothing else is announced or owed.

Why a thread, not the event loop: torch calls block for milliseconds to seconds. Why one
worker: a model call already uses every core (or the whole GPU); two would only contend.

Items whose caller gave up (deadline passed, call cancelled) are dropped before compute,
so a burst of abandoned calls does not delay the live ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch
from facemux.models.errors import DeadlineExpiredError, ResourceExhaustedError
from facemux.models.networks import Decoder
from torch import Tensor

log = logging.getLogger(__name__)


class Op(Enum):
    ENCODE = "encode"  # faces -> latents
    SWAP = "swap"  # faces -> encoder -> decoder -> faces (+ masks)
    DECODE = "decode"  # latents -> decoder -> faces (+ masks)


@dataclass
class Result:
    latents: np.ndarray | None = None  # (N, C, H, W) float32 for ENCODE
    faces: np.ndarray | None = None  # (N, R, R, 3) uint8 for SWAP / DECODE
    masks: np.ndarray | None = None  # (N, R, R) uint8 when the decoder has a mask head
    # For items whose inputs were device tensors: faces (N, 3, R, R) and masks (N, R, R),
    # uint8, left on the device.
    faces_t: Tensor | None = None
    masks_t: Tensor | None = None
    finished: Any = None  # what the item's `finish` made of this result, when it has one


@dataclass
class Item:
    op: Op
    # Faces (N,R,R,3) uint8, or latents (N,C,H,W) float32 for DECODE. SWAP also takes
    # faces as a (N,3,R,R) uint8 tensor on the model's device, and then answers in
    # faces_t / masks_t on the device (tensor in, tensor out).
    inputs: np.ndarray | Tensor
    decoder: Decoder | None
    deadline: float | None  # time.monotonic() seconds
    future: concurrent.futures.Future[Result] = field(default_factory=concurrent.futures.Future)
    submitted_at: float = 0.0  # scheduler clock, set by submit()
    # Host work on the result (encoding, provenance) done by the scheduler's finishing
    # thread before the future resolves, while the worker runs the next batch; its return
    # value is Result.finished. The items of a batch are finished together, in order, so
    # their callers all get their answers at about the same time and come back together.
    finish: Callable[[Result], Any] | None = None
    # One watermark payload per face: the faces come back marked, the whole batch's in one
    # pass where the model left them (on the GPU, before the copy to the host).
    marks: list[bytes] | None = None
    # Set by run(): the caller's event loop and the future it awaits there. The callers of
    # a batch on one loop are woken by one call into that loop (_settle), not one each.
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[Result]] | None = None

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class BatchStats:
    faces: int
    items: int
    seconds: float
    # Per computed item: seconds from submit() until its batch started.
    queue_waits: tuple[float, ...] = ()


_Outcome = tuple[Item, Result | None, BaseException | None]


def _settle(outcomes: Sequence[_Outcome]) -> None:
    """Resolve each item's future with its result or error, and wake the callers awaiting
    them in run() with one call into each event loop for all of them: a wake-up of a loop
    (a write to its self-pipe, a pass of its selector) per caller cost as much as the
    rest of a small call's answer."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Result], _Outcome]]] = {}
    for outcome in outcomes:
        item, result, error = outcome
        if error is None:
            assert result is not None
            item.future.set_result(result)
        else:
            item.future.set_exception(error)
        if item.waiter is not None:
            loop, waiter = item.waiter
            by_loop.setdefault(loop, []).append((waiter, outcome))
    for loop, waiters in by_loop.items():
        with suppress(RuntimeError):  # the loop is closed: nobody is left to answer
            loop.call_soon_threadsafe(_wake, waiters)


def _wake(waiters: list[tuple[asyncio.Future[Result], _Outcome]]) -> None:
    """On the callers' loop: hand each its outcome, unless it stopped waiting (cancelled)."""
    for waiter, (_, result, error) in waiters:
        if waiter.done():
            continue
        if error is None:
            assert result is not None
            waiter.set_result(result)
        else:
            waiter.set_exception(error)


class Clock(Protocol):
    """Time for the worker: the system clock in service, a manual one in tests."""

    def monotonic(self) -> float: ...

    def wait(self, cv: threading.Condition, timeout: float | None) -> None:
        """Block on `cv` (held by the caller) until notified or `timeout` seconds pass."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, cv: threading.Condition, timeout: float | None) -> None:
        cv.wait(timeout)


class _Announcement:
    """Faces a handler said it would submit; submit() consumes them."""

    def __init__(self, faces: int) -> None:
        self.faces = faces


# The handler's open announcement, if any: submit() finds it here, so call sites need not
# thread it through (asyncio tasks and asyncio.to_thread copy the context).
_announced: contextvars.ContextVar[_Announcement | None] = contextvars.ContextVar(
    "facemux_announced", default=None
)


class ModelBackend(Protocol):
    """What the scheduler needs from the model (Runtime implements it)."""

    def encode_batch(self, faces: np.ndarray | Tensor | Sequence[np.ndarray | Tensor]) -> Tensor:
        """(N,R,R,3) uint8 RGB crops (or the parts of a batch, in order; a part may be a
        (N,3,R,R) uint8 tensor on the device) -> latents on the device."""
        ...

    def decode_batch(
        self, decoder: Decoder, latents: Tensor, marks: Sequence[bytes | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Latents on the device -> (N,R,R,3) uint8 faces and (N,R,R) uint8 masks or None;
        faces with a watermark payload in `marks` come back marked."""
        ...

    def decode_batch_t(
        self, decoder: Decoder, latents: Tensor, marks: Sequence[bytes | None] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """As decode_batch, faces (N,3,R,R) and masks (N,R,R) uint8 left on the device."""
        ...

    def latents_to_device(self, latents: np.ndarray) -> Tensor: ...

    def enter_compute_thread(self) -> None:
        """Called once, first, on the thread that will run every batch."""
        ...

    def latents_to_host(self, latents: Tensor) -> np.ndarray: ...

    def face_template(self) -> np.ndarray:
        """The (68, 2) mean face the model's crops are aligned to (its encoder checkpoint's);
        the frame pipeline, which reaches the model through the scheduler, aligns with it."""
        ...


@dataclass
class _Owed:
    """Callers (items) a batch answered that have not submitted again. Counted in items,
    not faces: a caller comes back with one item whatever its face count, and a caller
    whose next call has fewer faces must not leave a debt that holds batches back."""

    answered_at: float  # clock time its callers got their results
    callers: int


# The round trip is learned as TCP learns its retransmission timeout (RFC 6298): a
# smoothed mean and mean deviation, and a convoy is due back after mean + 4 deviations, so
# a noisy machine widens the wait instead of cutting convoys. Bounded, so callers that
# pause between calls cannot teach the scheduler to hold batches for long.
ROUND_TRIP_GAIN = 1 / 8
DEVIATION_GAIN = 1 / 4
MAX_ROUND_TRIP_S = 1.0


class Scheduler:
    def __init__(
        self,
        backend: ModelBackend,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_queue_faces: int = 2048,
        batching: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
        clock: Clock | None = None,
        start: bool = True,
    ) -> None:
        """`start=False` leaves the worker loop to the caller (`step()`): tests drive it."""
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue_faces = max_queue_faces
        self.batching = batching
        self.on_batch = on_batch
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._queue: deque[Item] = deque()
        self._queued_faces = 0
        self._announced_faces = 0  # announced by handlers, not yet submitted
        # Returning work by batch, oldest first; arrivals pay off the oldest first.
        self._owed: deque[_Owed] = deque()
        # Learned: from a batch's results until the last of its callers is back.
        self.round_trip_s = 0.0
        self.round_trip_dev_s = 0.0
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="facemux-batcher", daemon=True)
        self._finishing: queue.SimpleQueue[list[tuple[Item, Result]] | None] = queue.SimpleQueue()
        self._finisher = threading.Thread(target=self._finish, name="facemux-finisher", daemon=True)
        self._finisher.start()
        self._entered = threading.Event()
        if start:
            self._thread.start()
            # Settled before anything else computes: the backend may set up per-thread
            # state (its intra-op threads) that other threads' first ops depend on.
            self._entered.wait()

    # -- submission ------------------------------------------------------------------------

    def queue_depth(self) -> int:
        """Faces waiting (not yet taken into a batch)."""
        return self._queued_faces

    @contextmanager
    def expect(self, faces: int) -> Iterator[None]:
        """Announce that this handler will submit one item of about `faces` faces: enter
        it where the request starts preprocessing, submit inside it. A batch that forms
        meanwhile waits for the announced faces (no gap of `max_wait_s` without an
        arrival); leaving the block withdraws them if nothing was submitted (bad input,
        errors), so an abandoned announcement delays no one."""
        ann = _Announcement(max(0, faces))
        with self._cv:
            self._announced_faces += ann.faces
        token = _announced.set(ann)
        try:
            yield
        finally:
            _announced.reset(token)
            with self._cv:
                # Submitted (the usual end): submit() settled the faces and woke the
                # worker already; waking it again would only cost it a pass and both
                # threads a switch, on every call.
                if ann.faces:
                    self._announced_faces -= ann.faces
                    ann.faces = 0
                    self._cv.notify()

    def submit(self, item: Item) -> concurrent.futures.Future[Result]:
        """Enqueue from any thread; the future resolves with the result or the error."""
        ann = _announced.get()
        with self._cv:
            if ann is not None and ann.faces:
                # Announced work becomes queued work in one step: the worker never sees it
                # as neither (and closes a batch it was about to join). A handler submits
                # once per announcement, so all of it is settled here: a smaller item than
                # announced must not leave its own batch waiting for the rest.
                self._announced_faces -= ann.faces
                ann.faces = 0
            now = self.clock.monotonic()
            self._pay_back(now)
            if self._stopping:
                raise ResourceExhaustedError("the server is shutting down; retry elsewhere")
            if self._queued_faces + item.size > self.max_queue_faces and self._queue:
                raise ResourceExhaustedError(
                    f"the model queue is full ({self._queued_faces} faces waiting, limit "
                    f"{self.max_queue_faces}); retry with backoff or send smaller batches"
                )
            item.submitted_at = now
            self._queue.append(item)
            self._queued_faces += item.size
            self._cv.notify()
        return item.future

    async def run(self, item: Item) -> Result:
        """Submit and await from the event loop; cancelling the caller frees the slot."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Result] = loop.create_future()
        item.waiter = (loop, waiter)
        fut = self.submit(item)
        try:
            return await waiter
        except asyncio.CancelledError:
            fut.cancel()
            raise

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread.ident is not None:  # not started when a test steps it by hand
            self._thread.join(timeout=30)
        self._finishing.put(None)
        self._finisher.join(timeout=30)

    # -- worker ----------------------------------------------------------------------------

    def _take_batch(self) -> list[Item]:
        """Block for the first item, then gather more until full, until no more work is on
        its way, or until `max_wait_s` has passed (a hard bound)."""
        with self._cv:
            while not self._queue and not self._stopping:
                self.clock.wait(self._cv, None)
            if self._stopping and not self._queue:
                return []
            batch = [self._queue.popleft()]
            faces = batch[0].size
            if self.batching:
                last_event = self.clock.monotonic()
                deadlines = [i.deadline for i in batch if i.deadline is not None]
                while faces < self.max_batch:
                    if self._queue:
                        if faces + self._queue[0].size > self.max_batch:
                            break
                        nxt = self._queue.popleft()
                        batch.append(nxt)
                        faces += nxt.size
                        last_event = max(last_event, nxt.submitted_at)
                        if nxt.deadline is not None:
                            deadlines.append(nxt.deadline)
                        continue
                    now = self.clock.monotonic()
                    self._expire_owed(now)
                    # Returning work is waited for until max_wait_s after it is due back
                    # (the newest convoy is due last); older debts are only bookkeeping.
                    owed_until = 0.0
                    if self._owed:
                        owed_until = self._owed[-1].answered_at + self.due_after_s()
                        owed_until += self.max_wait_s
                    if not self._announced_faces and owed_until <= now:
                        break  # nothing on its way: waiting would only add latency
                    # Otherwise no gap of max_wait_s without an arrival, except for
                    # returning work not yet due.
                    give_up = max(last_event + self.max_wait_s, owed_until)
                    if deadlines:
                        give_up = min(give_up, min(deadlines))
                    left = give_up - now
                    if left <= 0:
                        break
                    self.clock.wait(self._cv, left)
            self._queued_faces -= sum(i.size for i in batch)
            return batch

    def _run(self) -> None:
        try:
            self.backend.enter_compute_thread()
        except Exception:  # a tuning step: batches still run without it
            log.exception("could not prepare the batch thread")
        finally:
            self._entered.set()
        while self.step():
            pass

    def step(self) -> bool:
        """Form one batch, compute it and answer its callers; False once stopped."""
        batch = self._take_batch()
        if not batch:
            return False
        self._run_batch(batch)
        return True

    def _run_batch(self, batch: list[Item]) -> None:
        now = self.clock.monotonic()
        live = []
        expired: list[_Outcome] = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue  # the caller cancelled while waiting
            if item.deadline is not None and now > item.deadline:
                error = DeadlineExpiredError("deadline passed while queued; not computed")
                expired.append((item, None, error))
                continue
            live.append(item)
        _settle(expired)
        if not live:
            return
        waits = tuple(now - i.submitted_at for i in live)
        faces = sum(i.size for i in live)
        t0 = time.perf_counter()
        try:
            results = self._compute(live)
        except BaseException as exc:  # every caller learns what went wrong
            log.exception("model batch of %d items failed", len(live))
            self._answered(len(live))
            _settle([(item, None, exc) for item in live])
            return
        seconds = time.perf_counter() - t0
        # Owed before the callers learn their results, so none can come back unowed.
        self._answered(len(live))
        to_finish = []
        done: list[_Outcome] = []
        for item, res in zip(live, results, strict=True):
            if item.finish is None:
                done.append((item, res, None))
            else:
                to_finish.append((item, res))
        _settle(done)
        if to_finish:
            self._finishing.put(to_finish)
        if self.on_batch is not None:
            self.on_batch(BatchStats(faces, len(live), seconds, waits))

    def _answered(self, callers: int) -> None:
        """A batch's callers are about to get their results. Closed-loop callers come
        back after a round trip (response, network, next request), spread over it."""
        if not self.batching:
            return
        with self._cv:
            self._owed.append(_Owed(self.clock.monotonic(), callers))

    def due_after_s(self) -> float:
        """How long after its results a convoy is expected back, whole."""
        return min(self.round_trip_s + 4 * self.round_trip_dev_s, MAX_ROUND_TRIP_S)

    def _learn(self, round_trip: float) -> None:
        sample = min(round_trip, MAX_ROUND_TRIP_S)
        self.round_trip_dev_s += DEVIATION_GAIN * (
            abs(sample - self.round_trip_s) - self.round_trip_dev_s
        )
        self.round_trip_s += ROUND_TRIP_GAIN * (sample - self.round_trip_s)

    def _expire_owed(self, now: float) -> None:
        """Forget debts no longer waited for (max_wait_s past due): their callers left or
        pause between calls. The round trip was at least that long, which is what teaches
        a scheduler that has not learned it yet (or learned it on a quieter machine)."""
        lifetime = self.due_after_s() + 2 * self.max_wait_s
        while self._owed and now - self._owed[0].answered_at > lifetime:
            self._learn(lifetime)
            self._owed.popleft()

    def _pay_back(self, now: float) -> None:
        """An item arrived: a caller is back (or a new one came; either way one fewer is
        owed). Callers are anonymous: the oldest owed batch is paid first."""
        self._expire_owed(now)
        if self._owed:
            self._owed[0].callers -= 1
            if not self._owed[0].callers:
                # The last caller of that batch is back: that is its round trip.
                self._learn(now - self._owed.popleft().answered_at)

    def _finish(self) -> None:
        while (batch := self._finishing.get()) is not None:
            outcomes: list[_Outcome] = []
            for item, res in batch:
                assert item.finish is not None
                try:
                    res.finished = item.finish(res)
                    outcomes.append((item, res, None))
                except BaseException as exc:  # the caller learns what went wrong
                    outcomes.append((item, None, exc))
            # Answered together, after the whole batch is finished: callers answered one by
            # one come back one by one, and the batch they form gives up waiting half full.
            _settle(outcomes)

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
                assert isinstance(it.inputs, np.ndarray)
                latents[i] = b.latents_to_device(it.inputs)
        # 2. One decoder pass per identity over its group.
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            if it.op is not Op.ENCODE:
                assert it.decoder is not None
                groups.setdefault(id(it.decoder), []).append(i)
        for group in groups.values():
            # Host answers and device answers (tensor items) in one decoder pass each; both
            # kinds in one group (aligned crops and frames of one identity) are rare.
            on_device = [i for i in group if isinstance(items[i].inputs, Tensor)]
            on_host = [i for i in group if not isinstance(items[i].inputs, Tensor)]
            for members in (on_host, on_device):
                if members:
                    self._decode_group(items, members, latents, results, members is on_device)
        return results

    def _decode_group(
        self,
        items: list[Item],
        members: list[int],
        latents: dict[int, Tensor],
        results: list[Result],
        on_device: bool,
    ) -> None:
        b = self.backend
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
        if on_device:
            faces_t, masks_t = b.decode_batch_t(decoder, z, marks)
        else:
            faces, masks = b.decode_batch(decoder, z, marks)
        start = 0
        for i in members:
            n = items[i].size
            if on_device:
                results[i].faces_t = faces_t[start : start + n]
                results[i].masks_t = None if masks_t is None else masks_t[start : start + n]
            else:
                results[i].faces = faces[start : start + n]
                results[i].masks = None if masks is None else masks[start : start + n]
            start += n
