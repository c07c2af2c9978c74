"""The server-wide budget of decoded pixels in flight.

A compressed image is small on the wire and large in memory (a 100 KB PNG can decode to
6000x6000 pixels), so message size limits say little about memory. Every call that decodes
images (Swap, SwapStream frames, Encode, Verify, UploadDataset) first reads the sizes from
the headers, then holds that many pixels of this budget while the decoded arrays exist. A
call that would take the server over the budget waits, first come first served, up to
`max_inflight_wait_seconds` (or its own deadline, if sooner), then fails with
RESOURCE_EXHAUSTED and a retry hint; so memory for decoded images is bounded by
`max_inflight_pixels` times the bytes each pixel costs, whatever the number of callers.

Acquired and released on the event loop (never from worker threads).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

from facemux.models.errors import ResourceExhaustedError
from facemux.service.cancel import CancelToken, current_cancel
from facemux.service.settings import Settings

T = TypeVar("T")

# Peak bytes of memory per decoded pixel while a call holds it, measured with
# bench/bombs.py: 6 for an 8-bit crop (the decoder's BGR array and its RGB copy), 16 for a
# 16-bit RGBA PNG, 22 for a full frame whose face fills it (decode, working copies and
# encode). Documented limits and the memory test use this figure.
BYTES_PER_PIXEL = 24


class PixelBudget:
    def __init__(self, capacity: int, max_wait_s: float) -> None:
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self._used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @classmethod
    def from_settings(cls, settings: Settings) -> PixelBudget:
        return cls(settings.max_inflight_pixels, settings.max_inflight_wait_seconds)

    @property
    def in_use(self) -> int:
        return self._used

    @asynccontextmanager
    async def hold(
        self, pixels: int, deadline: float | None = None, what: str = "request"
    ) -> AsyncIterator[None]:
        """Hold `pixels` of the budget for the body of the `async with`."""
        await self.acquire(pixels, deadline, what)
        try:
            yield
        finally:
            self.release(pixels)

    async def acquire(self, pixels: int, deadline: float | None = None, what: str = "") -> None:
        if pixels <= 0:
            return
        if pixels > self.capacity:
            # Settings keep max_request_pixels within the budget, so only a caller that
            # bypassed those checks gets here; waiting could never help.
            raise ResourceExhaustedError(
                f"{what or 'request'} needs {pixels} decoded pixels at once, more than the "
                f"server's whole budget of {self.capacity} (setting max_inflight_pixels)"
            )
        # First come, first served: a small request does not overtake a waiting large one,
        # which could otherwise starve.
        if not self._waiters and self._used + pixels <= self.capacity:
            self._used += pixels
            return
        timeout = self.max_wait_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, max(0.0, timeout))
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self.release(pixels)  # granted just as the wait ended
            else:
                with suppress(ValueError):
                    self._waiters.remove(entry)
                self._grant()  # a large waiter leaving the head may let others in
            if isinstance(exc, TimeoutError):
                raise ResourceExhaustedError(
                    f"the server is busy decoding other images ({self._used} of "
                    f"{self.capacity} decoded pixels in use, setting max_inflight_pixels); "
                    f"{what or 'this request'} waited {max(0.0, timeout):.1f} s for "
                    f"{pixels}: retry in a few seconds",
                    retry_after=1.0,
                ) from None
            raise

    async def run(
        self,
        pixels: int,
        deadline: float | None,
        what: str,
        fn: Callable[..., T],
        *args: Any,
    ) -> T:
        """fn(*args) in a worker thread while holding `pixels`. The pixels stay held until the
        thread returns, even when the call is cancelled first: the thread's arrays live on
        until then."""
        await self.acquire(pixels, deadline, what)
        # The thread's waits on shared batches give up when the call is cancelled.
        token = CancelToken()
        reset = current_cancel.set(token)
        try:
            task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        finally:
            current_cancel.reset(reset)

        def done(t: asyncio.Future[T]) -> None:
            self.release(pixels)
            if not t.cancelled():
                t.exception()  # retrieved here when the caller is gone

        task.add_done_callback(done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            token.cancel()
            raise

    def release(self, pixels: int) -> None:
        if pixels <= 0:
            return
        self._used -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            pixels, future = self._waiters[0]
            if future.done():  # timed out or cancelled, not yet removed
                self._waiters.popleft()
                continue
            if self._used + pixels > self.capacity:
                return
            self._waiters.popleft()
            self._used += pixels
            future.set_result(None)
