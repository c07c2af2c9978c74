"""A call's cancellation, seen from the worker thread that runs its blocking work.

The handler awaits a thread (``PixelBudget.run``); when the client cancels or the server
gives up on the call, the handler's task is cancelled but the thread runs on. The thread
can still stop waiting for shared work (a detector or model batch) and let that work skip
its item: the handler cancels the call's token, and everything the thread is waiting on has
registered a callback on it (usually ``Future.cancel``).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable

__all__ = ["CancelToken", "current_cancel", "on_cancel"]


class CancelToken:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._callbacks: list[Callable[[], object]] = []

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def on_cancel(self, cb: Callable[[], object]) -> None:
        """Run ``cb`` when the call is cancelled (at once if it already is)."""
        with self._lock:
            if not self._cancelled:
                self._callbacks.append(cb)
                return
        cb()


# The call's token: set by the handler before it starts the thread (asyncio.to_thread
# copies the context), read by whatever the thread waits on.
current_cancel: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar(
    "facemux_cancel", default=None
)


def on_cancel(cb: Callable[[], object]) -> None:
    """Register ``cb`` on the current call's token, if the work runs for a call."""
    token = current_cancel.get()
    if token is not None:
        token.on_cancel(cb)
