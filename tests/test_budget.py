"""The server-wide budget of decoded pixels: first come first served, bounded waits, and
pixels held until the worker thread that uses them is done."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import cv2
import pytest
from common import Models, face_image, make_store, png
from facemux.client import FacemuxClient
from facemux.client.errors import ResourceExhausted
from facemux.models.errors import InvalidInputError, ResourceExhaustedError
from facemux.service.budget import PixelBudget
from facemux.service.server import ServerThread
from facemux.service.settings import Settings
from facemux.v1 import swap_service_pb2 as spb
from facemux.v1 import types_pb2 as tpb


def test_waits_then_resource_exhausted_with_retry_hint() -> None:
    async def main() -> None:
        budget = PixelBudget(100, max_wait_s=0.2)
        await budget.acquire(80)
        t0 = time.monotonic()
        with pytest.raises(ResourceExhaustedError, match="max_inflight_pixels") as info:
            await budget.acquire(30)
        assert 0.15 < time.monotonic() - t0 < 2
        assert info.value.retry_after is not None
        assert budget.in_use == 80
        budget.release(80)
        await budget.acquire(100)  # nothing left behind by the waiter that gave up
        assert budget.in_use == 100

    asyncio.run(main())


def test_deadline_shortens_the_wait() -> None:
    async def main() -> None:
        budget = PixelBudget(10, max_wait_s=30)
        await budget.acquire(10)
        t0 = time.monotonic()
        with pytest.raises(ResourceExhaustedError):
            await budget.acquire(1, deadline=time.monotonic() + 0.1)
        assert time.monotonic() - t0 < 2

    asyncio.run(main())


def test_try_acquire_takes_only_what_needs_no_wait() -> None:
    async def main() -> None:
        budget = PixelBudget(100, max_wait_s=5)
        assert budget.try_acquire(60)
        assert not budget.try_acquire(50)  # no room: nothing taken
        assert budget.in_use == 60
        waiter = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0.01)
        # Room for 30, but a caller is queued first: it is not overtaken.
        assert not budget.try_acquire(30)
        assert budget.in_use == 60
        budget.release(60)
        await waiter
        assert budget.try_acquire(50)
        assert budget.in_use == 100

    asyncio.run(main())


def test_first_come_first_served() -> None:
    async def main() -> None:
        budget = PixelBudget(100, max_wait_s=5)
        await budget.acquire(60)
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await budget.acquire(n)
            order.append(name)

        big = asyncio.create_task(take("big", 90))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(take("small", 20))  # would fit now, but big came first
        await asyncio.sleep(0.05)
        assert order == []
        budget.release(60)
        await big
        assert order == ["big"]
        budget.release(90)
        await small
        assert order == ["big", "small"]

    asyncio.run(main())


def test_more_than_the_whole_budget_is_refused_at_once() -> None:
    async def main() -> None:
        budget = PixelBudget(100, max_wait_s=30)
        t0 = time.monotonic()
        with pytest.raises(ResourceExhaustedError, match="whole budget"):
            await budget.acquire(101)
        assert time.monotonic() - t0 < 1

    asyncio.run(main())


def test_pixels_stay_held_until_the_thread_returns() -> None:
    async def main() -> None:
        budget = PixelBudget(100, max_wait_s=5)
        gate = threading.Event()
        call = asyncio.create_task(budget.run(70, None, "test", gate.wait, 5))
        await asyncio.sleep(0.05)
        assert budget.in_use == 70
        call.cancel()  # the caller goes away; its worker thread still holds the arrays
        with pytest.raises(asyncio.CancelledError):
            await call
        assert budget.in_use == 70
        gate.set()
        for _ in range(100):
            if budget.in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.in_use == 0

    asyncio.run(main())


def test_settings_keep_one_image_within_the_budget() -> None:
    with pytest.raises(InvalidInputError, match="max_inflight_pixels"):
        Settings(
            max_image_pixels=50,
            max_request_pixels=100,
            max_inflight_pixels=40,
            max_verify_pixels=40,
        )
    with pytest.raises(InvalidInputError, match="max_request_pixels"):
        Settings(
            max_image_pixels=50,
            max_request_pixels=40,
            max_inflight_pixels=100,
            max_verify_pixels=40,
        )


def test_a_call_over_the_budget_is_resource_exhausted_with_retry_after(
    tmp_path: Path, models: Models
) -> None:
    # Room for one full-size frame at a time and no waiting: while a large frame is being
    # swapped, any other call that decodes an image is refused with a retry hint.
    make_store(tmp_path / "store", models, ("alice",))
    settings = Settings(
        port=0,
        auth="off",
        audit_log="",
        store=tmp_path / "store",
        max_image_pixels=4_000_000,
        max_verify_pixels=4_000_000,
        max_inflight_pixels=4_000_000,
        max_inflight_wait_seconds=0,
    )
    side = 2000
    frame = cv2.resize(face_image(3), (side, side), interpolation=cv2.INTER_CUBIC)
    box = tpb.Box(x_min=100, y_min=100, x_max=side - 100, y_max=side - 100)
    big = spb.SwapRequest(
        identity="alice",
        frame=tpb.Image(encoded=png(frame)),
        options=spb.SwapOptions(faces=[spb.FaceHint(box=box)]),
    )
    small = spb.SwapRequest(
        identity="alice", faces=spb.FaceBatch(faces=[tpb.Image(encoded=png(face_image(0)))])
    )
    with ServerThread(settings) as srv, FacemuxClient(srv.target, timeout=60) as c:
        c.wait_ready(30)
        c._call(c.swap_stub.Swap, small)
        done: list[object] = []
        first = threading.Thread(target=lambda: done.append(c._call(c.swap_stub.Swap, big)))
        first.start()
        # Small calls start once the frame holds the budget: one started earlier could hold
        # a few pixels when the frame arrives and, with no waiting allowed, refuse it.
        budget = srv.app.budget if srv.app else None
        assert budget is not None
        while first.is_alive() and budget.in_use < side * side:
            time.sleep(0.001)
        refused: ResourceExhausted | None = None
        while first.is_alive() and refused is None:  # small calls while the frame holds it
            try:
                c._call(c.swap_stub.Swap, small)
            except ResourceExhausted as exc:
                refused = exc
        first.join(60)
        assert done, "the large frame should have been served"
        assert refused is not None, "no call was refused while the frame held the budget"
        assert "max_inflight_pixels" in refused.details
        assert refused.retry_after == 1.0
        c._call(c.swap_stub.Swap, small)  # served again once the frame is done
