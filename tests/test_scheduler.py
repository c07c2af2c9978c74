"""The batching scheduler with the real model: batching changes nothing but speed; bad,
late and cancelled items fail alone; closed-loop callers fill their batches."""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from common import Models, decode_png, face_image, make_store, png
from facemux.client import FacemuxClient, InvalidArgument
from facemux.models.errors import DeadlineExpiredError, ResourceExhaustedError
from facemux.models.networks import Decoder
from facemux.service.runtime import Runtime
from facemux.service.scheduler import (
    BatchStats,
    Item,
    Op,
    Scheduler,
    SystemClock,
)
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import swap_service_pb2_grpc, types_pb2
from torch import Tensor


@pytest.fixture
def runtime(tmp_path: Path, models: Models) -> Runtime:
    store = make_store(tmp_path / "store", models, ("alice", "bob"))
    rt = Runtime(Settings(store=store.root), store)
    rt.load()
    return rt


@pytest.fixture
def batches() -> list[BatchStats]:
    return []


@pytest.fixture
def scheduler(runtime: Runtime, batches: list[BatchStats]) -> Iterator[Scheduler]:
    s = Scheduler(
        runtime, max_batch=64, max_wait_s=0.5, max_queue_faces=16, on_batch=batches.append
    )
    yield s
    s.stop()


def _faces(seed: int, n: int) -> np.ndarray:
    return np.stack([face_image(seed + i) for i in range(n)])


def test_mixed_identities_in_one_batch_match_one_at_a_time(
    runtime: Runtime, scheduler: Scheduler, batches: list[BatchStats]
) -> None:
    alice, bob = runtime.decoder("alice").decoder, runtime.decoder("bob").decoder
    z = runtime.latents_to_host(runtime.encode_batch(_faces(50, 2)))
    items = [
        Item(Op.SWAP, _faces(0, 2), alice, None),
        Item(Op.SWAP, _faces(10, 3), bob, None),
        Item(Op.ENCODE, _faces(20, 1), None, None),
        Item(Op.DECODE, z, alice, None),
        Item(Op.SWAP, _faces(30, 1), alice, None),
    ]
    # Hold the queue so all five land in one batch.
    with scheduler._cv:
        futures = [scheduler.submit(it) for it in items]
    results = [f.result(timeout=30) for f in futures]
    assert [(b.items, b.faces) for b in batches] == [(5, 9)]

    solo = Scheduler(runtime, batching=False)
    try:
        for it, got in zip(items, results, strict=True):
            want = solo.submit(Item(it.op, it.inputs, it.decoder, None)).result(timeout=30)
            if it.op is Op.ENCODE:
                assert got.latents is not None and want.latents is not None
                np.testing.assert_allclose(got.latents, want.latents, rtol=1e-4, atol=1e-5)
            else:
                assert got.faces is not None and want.faces is not None
                # Batch size may change the float summation order: allow one grey level.
                diff = np.abs(got.faces.astype(int) - want.faces.astype(int))
                assert diff.max() <= 1
                assert got.masks is not None and want.masks is not None
                assert got.faces.shape[0] == it.inputs.shape[0]
    finally:
        solo.stop()


def test_batch_is_bounded_by_max_batch(runtime: Runtime, batches: list[BatchStats]) -> None:
    s = Scheduler(runtime, max_batch=4, max_wait_s=0.5, on_batch=batches.append)
    try:
        alice = runtime.decoder("alice").decoder
        with s._cv:
            futures = [s.submit(Item(Op.SWAP, _faces(i, 1), alice, None)) for i in range(6)]
        for f in futures:
            f.result(timeout=30)
    finally:
        s.stop()
    assert [b.faces for b in batches] == [4, 2]


def test_queue_full_is_resource_exhausted_and_recovers(
    runtime: Runtime, scheduler: Scheduler
) -> None:
    alice = runtime.decoder("alice").decoder
    with scheduler._cv:
        first = scheduler.submit(Item(Op.SWAP, _faces(0, 10), alice, None))
        with pytest.raises(ResourceExhaustedError, match="queue is full"):
            scheduler.submit(Item(Op.SWAP, _faces(0, 10), alice, None))
        assert scheduler.queue_depth() == 10
    first.result(timeout=30)
    assert scheduler.queue_depth() == 0
    scheduler.submit(Item(Op.SWAP, _faces(0, 10), alice, None)).result(timeout=30)


def test_expired_and_cancelled_items_are_dropped_before_compute(
    runtime: Runtime, scheduler: Scheduler, batches: list[BatchStats]
) -> None:
    alice = runtime.decoder("alice").decoder
    with scheduler._cv:
        late = scheduler.submit(Item(Op.SWAP, _faces(0, 3), alice, time.monotonic() - 1))
        gone = scheduler.submit(Item(Op.SWAP, _faces(0, 5), alice, None))
        live = scheduler.submit(Item(Op.SWAP, _faces(0, 2), alice, time.monotonic() + 60))
        assert gone.cancel()
    assert live.result(timeout=30).faces is not None
    with pytest.raises(DeadlineExpiredError):
        late.result(timeout=30)
    assert gone.cancelled()
    assert [b.faces for b in batches] == [2]  # only the live item was computed
    assert scheduler.queue_depth() == 0


def test_awaiting_caller_cancellation_frees_the_slot(
    runtime: Runtime, scheduler: Scheduler
) -> None:
    alice = runtime.decoder("alice").decoder

    async def main() -> None:
        with scheduler._cv:
            task = asyncio.ensure_future(scheduler.run(Item(Op.SWAP, _faces(0, 4), alice, None)))
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    t0 = time.monotonic()
    while scheduler.queue_depth() and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert scheduler.queue_depth() == 0


def test_callers_of_one_batch_are_woken_by_one_call_into_their_loop(runtime: Runtime) -> None:
    # Each wake-up of the event loop from another thread (a self-pipe write, a selector
    # pass) costs about what the rest of a small call's answer does: a batch of callers
    # answered together wakes their loop once, not once each.
    alice = runtime.decoder("alice").decoder
    scheduler = Scheduler(runtime, max_batch=8, max_wait_s=0.5, start=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wakes: list[str] = []
        plain = loop.call_soon_threadsafe

        def counted(callback: Callable[..., object], *args: object) -> asyncio.Handle:
            wakes.append(threading.current_thread().name)
            return plain(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]

        def item(k: int) -> Item:
            return Item(Op.SWAP, _faces(k, 1), alice, None, finish=lambda r: (k, r.faces))

        calls = [asyncio.ensure_future(scheduler.run(item(k))) for k in range(4)]
        while scheduler.queue_depth() < 4:
            await asyncio.sleep(0.01)
        stepper = threading.Thread(target=scheduler.step, name="stepper")
        stepper.start()
        results = await asyncio.wait_for(asyncio.gather(*calls), 60)
        stepper.join(60)
        assert [r.finished[0] for r in results] == [0, 1, 2, 3]
        assert wakes == ["facemux-finisher"]

    try:
        asyncio.run(main())
    finally:
        scheduler.stop()


def test_concurrent_calls_with_a_bad_one_through_the_server(tmp_path: Path, models: Models) -> None:
    make_store(tmp_path / "s", models, ("alice", "bob"))
    # Provenance off: the test compares exact model pixels (the watermark changes them).
    settings = Settings(
        port=0, auth="off", store=tmp_path / "s", max_batch_wait_ms=50, provenance="off"
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target) as c:
        c.wait_ready(30)
        expected = {n: c.swap_faces([png(face_image(1))], n).faces[0] for n in ("alice", "bob")}
        errors: list[BaseException] = []
        outputs: dict[int, bytes] = {}

        def call(i: int) -> None:
            try:
                if i == 3:
                    c.swap_faces([b"broken"], "alice")
                else:
                    outputs[i] = c.swap_faces([png(face_image(1))], ("alice", "bob")[i % 2]).faces[
                        0
                    ]
            except BaseException as exc:  # collected and checked below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(errors) == 1 and isinstance(errors[0], InvalidArgument)
        assert len(outputs) == 7
        for i, face in outputs.items():
            want = decode_png(expected[("alice", "bob")[i % 2]]).astype(int)
            # Batched with other calls or not, each gets its own identity's face.
            assert np.abs(decode_png(face).astype(int) - want).max() <= 1


class _LateClock(SystemClock):
    """The system clock an hour ahead: every deadline a caller gives has passed by the time
    the scheduler looks at its item, while gRPC (on the real clock) still waits for the
    answer."""

    def monotonic(self) -> float:
        return super().monotonic() + 3600.0


def test_a_swap_whose_deadline_passes_in_the_queue_is_deadline_exceeded(
    tmp_path: Path, models: Models
) -> None:
    make_store(tmp_path / "s", models, ("alice",))
    settings = Settings(port=0, auth="off", store=tmp_path / "s", provenance="off")
    request = spb.SwapRequest(
        identity="alice", faces=spb.FaceBatch(faces=[types_pb2.Image(encoded=png(face_image(1)))])
    )
    with (
        ServerThread(settings) as srv,
        FacemuxClient(srv.target) as client,
        grpc.insecure_channel(srv.target) as channel,
    ):
        client.wait_ready(30)
        stub = swap_service_pb2_grpc.SwapServiceStub(channel)
        assert stub.Swap(request, timeout=30).faces_swapped == 1
        assert srv.app is not None
        srv.app.scheduler.clock = _LateClock()
        with pytest.raises(grpc.RpcError) as err:
            stub.Swap(request, timeout=30)
        # The server's own answer (its message), not gRPC's when the deadline really passes.
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "queued" in (err.value.details() or "")
        # Without a deadline nothing expires: the server goes on serving.
        assert stub.Swap(request).faces_swapped == 1


# -- batch formation under a controlled clock -------------------------------------------------


class SimClock:
    """Simulated time for a scheduler driven by `step()` on the test thread: where the worker
    would block, the clock instead runs the next scheduled event (a caller submitting) or
    jumps to the wait's timeout, whichever comes first."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), fn))

    def _run_next(self) -> None:
        when, _, fn = heapq.heappop(self._events)
        self.now = max(self.now, when)
        fn()

    def wait(self, cv: threading.Condition, timeout: float | None) -> None:
        if timeout is None:
            assert self._events, "the worker would wait forever"
            self._run_next()
        elif self._events and self._events[0][0] <= self.now + timeout:
            self._run_next()
        else:
            self.now += timeout

    def sleep(self, seconds: float) -> None:
        """The model computing: callers due meanwhile submit (and queue)."""
        end = self.now + seconds
        while self._events and self._events[0][0] <= end:
            self._run_next()
        self.now = end


class TimedModel:
    """The real tiny model, charged in simulated time like a CPU model: a fixed cost per
    batch plus a cost per face."""

    def __init__(self, runtime: Runtime, clock: SimClock) -> None:
        self.runtime = runtime
        self.clock = clock

    def encode_batch(self, faces: np.ndarray | Sequence[np.ndarray]) -> Tensor:
        n = len(faces) if isinstance(faces, np.ndarray) else sum(len(f) for f in faces)
        self.clock.sleep(0.015 + 0.002 * n)
        return self.runtime.encode_batch(faces)

    def decode_batch(
        self, decoder: Decoder, latents: Tensor, marks: Sequence[bytes | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return self.runtime.decode_batch(decoder, latents, marks)

    def latents_to_device(self, latents: np.ndarray) -> Tensor:
        return self.runtime.latents_to_device(latents)

    def latents_to_host(self, latents: Tensor) -> np.ndarray:
        return self.runtime.latents_to_host(latents)


def closed_loop(
    runtime: Runtime,
    callers: int,
    batches: int,
    round_trip: Callable[[random.Random], float],
    max_wait_s: float = 0.010,
    leave_after: dict[int, int] | None = None,
    faces_per_call: Callable[[int], int] = lambda n: 1,
    max_batch: int = 0,
) -> list[BatchStats]:
    """`callers` closed-loop callers of one face each, max batch = callers: each submits
    again `round_trip()` seconds after its answer (response path, network, next request),
    caller k stops after leave_after[k] answers. Returns the stats of `batches` batches."""
    clock = SimClock()
    stats: list[BatchStats] = []
    model = TimedModel(runtime, clock)
    s = Scheduler(
        model,
        max_batch=max_batch or callers,
        max_wait_s=max_wait_s,
        on_batch=stats.append,
        clock=clock,
        start=False,
    )
    alice = runtime.decoder("alice").decoder
    face = _faces(0, 1)
    rng = random.Random(7)
    answers = [0] * callers

    def submit(k: int) -> None:
        faces = np.repeat(face, faces_per_call(answers[k]), axis=0)
        s.submit(Item(Op.SWAP, faces, alice, None)).add_done_callback(lambda _: answered(k))

    def answered(k: int) -> None:
        answers[k] += 1
        if leave_after is None or answers[k] < leave_after.get(k, 1 << 30):
            clock.at(clock.now + round_trip(rng), lambda: submit(k))

    for k in range(callers):  # they start spread over a round trip
        clock.at(round_trip(rng), lambda k=k: submit(k))  # type: ignore[misc]
    steps = 0
    while len(stats) < batches:
        assert s.step()
        steps += 1
        # A batch that fails is not counted: stop rather than loop (and grow) for ever.
        assert steps <= 4 * batches, "batches keep failing; see the log"
    return stats


def test_closed_loop_callers_fill_their_batches(runtime: Runtime) -> None:
    """Answers reach 8 callers together; each is back after a round trip of 18-43 ms, a
    spread (25 ms) wider than the batch wait (10 ms). Waiting 10 ms after the first
    arrival cuts this convoy into two batches that then alternate; the scheduler must
    keep it whole."""
    k = 8
    stats = closed_loop(runtime, k, 120, lambda rng: 0.018 + rng.uniform(0, 0.025))
    sizes = [b.faces for b in stats[3:]]  # after the callers' first (scattered) arrivals
    assert sum(sizes) / len(sizes) >= 0.95 * k, sizes


def test_lone_caller_is_dispatched_without_waiting(runtime: Runtime) -> None:
    stats = closed_loop(runtime, 1, 30, lambda rng: 0.005 + rng.uniform(0, 0.02), max_batch=8)
    assert [b.faces for b in stats] == [1] * 30
    assert all(w == 0.0 for b in stats for w in b.queue_waits)


def test_lone_caller_with_varying_face_counts_never_waits(runtime: Runtime) -> None:
    """Three faces, then one: the caller is back, not two faces short."""
    stats = closed_loop(
        runtime,
        1,
        20,
        lambda rng: 0.001 + rng.uniform(0, 0.002),
        faces_per_call=lambda n: 3 - 2 * (n % 2),
        max_batch=8,
    )
    assert [b.faces for b in stats] == [3, 1] * 10
    assert all(w == 0.0 for b in stats for w in b.queue_waits)


def test_a_caller_that_leaves_delays_one_batch_at_most(runtime: Runtime) -> None:
    """Callers that stop coming back are waited for once (until they are late), not on
    every later batch."""
    k = 4
    stats = closed_loop(
        runtime,
        k,
        60,
        lambda rng: 0.010 + rng.uniform(0, 0.004),
        leave_after={0: 20},
    )
    later = stats[25:]
    assert all(b.faces == k - 1 for b in later)
    # The round trip is learned, the leaver forgotten: nobody waits for it any more.
    assert max(w for b in later for w in b.queue_waits) < 0.005


def test_batch_waits_for_announced_work_and_not_for_withdrawn(runtime: Runtime) -> None:
    """A handler that is still preprocessing has announced its faces (`expect`): the batch
    waits for them; an announcement withdrawn without a submit (bad input) releases it."""
    clock = SimClock()
    stats: list[BatchStats] = []
    s = Scheduler(
        TimedModel(runtime, clock),
        max_batch=8,
        max_wait_s=0.010,
        on_batch=stats.append,
        clock=clock,
        start=False,
    )
    alice = runtime.decoder("alice").decoder

    def handler(enter: float, leave: float, submit: bool) -> None:
        # Each handler in its own context, as asyncio gives each RPC its own task.
        ctx = contextvars.copy_context()
        cm = s.expect(1)
        clock.at(enter, lambda: ctx.run(cm.__enter__))
        if submit:
            clock.at(leave, lambda: ctx.run(s.submit, Item(Op.SWAP, _faces(0, 1), alice, None)))
        clock.at(leave, lambda: ctx.run(cm.__exit__, None, None, None))

    handler(0.0, 0.001, submit=True)
    handler(0.0, 0.006, submit=True)  # arrives 5 ms after the first is taken
    assert s.step()
    assert stats[-1].faces == 2 and max(stats[-1].queue_waits) == pytest.approx(0.005)

    handler(1.0, 1.001, submit=True)
    handler(1.0, 1.003, submit=False)  # bad input: never submits
    assert s.step()
    assert stats[-1].faces == 1 and stats[-1].queue_waits == (pytest.approx(0.002),)


def test_k_closed_loop_clients_fill_batches_through_the_server(
    tmp_path: Path, models: Models
) -> None:
    """The load of the serving-efficiency report, smaller: 8 closed-loop grpc.aio callers on
    one channel, one JPEG crop per call, PNG back, provenance on, max batch 8 and a 10 ms
    batch wait; the server's own metrics must show batches close to full (the benchmark
    measures the figure precisely: bench/swap_throughput.py --convoy)."""
    k = 8
    make_store(tmp_path / "s", models, ("alice",))
    settings = Settings(
        port=0,
        auth="off",
        store=tmp_path / "s",
        max_batch_size=k,
        max_batch_wait_ms=10,
        metrics_port=-1,
    )
    jpeg = bytes(cv2.imencode(".jpg", face_image(3))[1].tobytes())
    request = spb.SwapRequest(
        identity="alice",
        faces=spb.FaceBatch(faces=[types_pb2.Image(encoded=jpeg)]),
        output=types_pb2.OutputOptions(format=types_pb2.IMAGE_FORMAT_PNG),
    )
    with ServerThread(settings) as srv:
        assert srv.app is not None
        hist = srv.app.metrics.batch_size
        with FacemuxClient(srv.target) as c:
            c.wait_ready(30)

        async def load() -> tuple[float, float]:
            async with grpc.aio.insecure_channel(srv.target) as channel:
                stub = swap_service_pb2_grpc.SwapServiceStub(channel)
                await asyncio.gather(*(stub.Swap(request, timeout=60) for _ in range(k)))
                before = _sum_count(hist)

                async def caller() -> None:
                    for _ in range(40):
                        await stub.Swap(request, timeout=60)

                await asyncio.gather(*(caller() for _ in range(k)))
                after = _sum_count(hist)
            return after[0] - before[0], after[1] - before[1]

        faces, batches = asyncio.run(load())
        samples = {
            (x.name, x.labels.get("le", "")): x.value
            for m in srv.app.metrics.registry.collect()
            for x in m.samples
        }
    assert faces == 40 * k
    assert faces / batches >= 0.85 * k, f"mean batch {faces / batches:.2f} of {k}"
    # The histogram resolves every size up to the largest batch; every item's wait is timed.
    assert all(("facemux_batch_size_bucket", f"{n}.0") in samples for n in range(1, k + 1))
    assert samples[("facemux_queue_wait_seconds_count", "")] == (40 + 1) * k


def _sum_count(hist: object) -> tuple[float, float]:
    from prometheus_client import Histogram

    assert isinstance(hist, Histogram)
    values = {s.name: s.value for m in hist.collect() for s in m.samples}
    return values["facemux_batch_size_sum"], values["facemux_batch_size_count"]
