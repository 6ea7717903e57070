"""What a gRPC call tells a request: whether the call ended (cancelled, disconnected), and its deadline.

The engine does the waiting, the deadlines and the cancelling; this module only reads the
call's context, defensively, so that the service works with grpc's context, a hub's own
context, or none at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..engine.errors import ClientGone, DeadlineExceeded

log = logging.getLogger(__name__)


class CallEnd:
    """Set once, when the call ends; then runs what was registered with `on_end`.

    A threading.Event with callbacks: a request waiting for a slot registers its withdrawal
    from the queue, so that a cancelled call gives its place back the moment the transport
    learns of the cancel, not when its waiting thread next looks.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def set(self, *_: Any) -> None:  # grpc passes nothing, aio's done callback the context
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def is_set(self) -> bool:
        return self._event.is_set()

    def on_end(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` when the call ends (at once if it has); returns a function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return lambda: self._unregister(callback)
        callback()
        return lambda: None

    def _unregister(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


def watch_termination(context: Any) -> CallEnd:
    """A `CallEnd` set when the RPC terminates (cancelled, disconnected, deadline, or done).

    Registered once per stream: grpc keeps every callback until the RPC ends.
    """
    terminated = CallEnd()
    add_callback = getattr(context, "add_callback", None)
    if callable(add_callback):
        try:
            add_callback(terminated.set)
        except Exception:  # a foreign context may refuse; is_active() still works
            log.debug("context.add_callback failed; relying on is_active()", exc_info=True)
    return terminated


class CallControl:
    """What one request needs to know about its call: cancelled, or past its deadline.

    The gRPC context is read defensively (any attribute may be missing), so the service works
    with grpc's context, a hub's own context, or none at all.
    """

    def __init__(self, context: Any, terminated: CallEnd | None = None) -> None:
        self._context = context
        self._terminated = terminated or watch_termination(context)

    def time_remaining(self) -> float | None:
        remaining = getattr(self._context, "time_remaining", None)
        if not callable(remaining):
            return None
        try:
            value = remaining()
        except Exception:
            return None
        return None if value is None else float(value)

    def deadline(self) -> float | None:
        """The call's deadline as a time.monotonic() value, or None."""
        remaining = self.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def is_active(self) -> bool:
        if self._terminated.is_set():
            return False
        active = getattr(self._context, "is_active", None)
        if not callable(active):
            return True
        try:
            return bool(active())
        except Exception:
            return True

    def on_end(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run `callback` when the call ends; returns a function that unregisters it."""
        return self._terminated.on_end(callback)

    def check(self) -> None:
        """Raise if the request must stop: DeadlineExceeded or ClientGone."""
        remaining = self.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed")
        if not self.is_active():
            raise ClientGone()
