"""The batching scheduler with the real model: batching changes nothing but speed; bad,
late and cancelled items fail alone."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import Models, decode_png, face_image, make_store, png
from facemux.client import FacemuxClient, InvalidArgument
from facemux.models.errors import ResourceExhaustedError
from facemux.service.runtime import Runtime
from facemux.service.scheduler import BatchStats, DeadlineExpiredError, Item, Op, Scheduler
from facemux.service.server import ServerThread
from facemux.service.settings import Settings


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
