"""Admission and call control for the service: who may generate now, and when to stop.

`Admission` lets at most `max_concurrency` generations run and `max_queue` wait, first come
first served, and refuses the rest at once. `CallControl` tells a running request whether its
call was cancelled, its deadline passed, or the server is shutting down. Both are plain
threading code with no model or protocol logic; the service owns what the errors become.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..proto import ml_service_pb2

log = logging.getLogger(__name__)
ErrorCode = ml_service_pb2.ErrorCode

# What a generation cancelled by the server's shutdown is answered (UNAVAILABLE).
CANCELLED_AT_SHUTDOWN = "the server is shutting down; the generation was cancelled"

# A waiting request re-checks its call this often, so a cancelled waiter leaves the queue
# promptly even on a context without add_callback.
_WAIT_SLICE_S = 0.05

# --------------------------------------------------------------------------- errors


class ServiceError(Exception):
    """An error the service answers with a specific code."""

    code: int = ErrorCode.ERROR_CODE_INTERNAL


class Unavailable(ServiceError):
    """Overloaded, shutting down or not ready: the client may retry later."""

    code = ErrorCode.ERROR_CODE_UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = ErrorCode.ERROR_CODE_DEADLINE_EXCEEDED


class ClientGone(Exception):
    """The client cancelled or disconnected: stop, nothing can be answered."""


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
    """What one request needs to know about its call: cancelled, past its deadline, shut down.

    The gRPC context is read defensively (any attribute may be missing), so the service works
    with grpc's context, a hub's own context, or none at all.
    """

    def __init__(self, context: Any, terminated: CallEnd | None = None) -> None:
        self._context = context
        self._terminated = terminated or watch_termination(context)
        self.server_cancelled = threading.Event()  # cancel_all(): the server is going down

    def time_remaining(self) -> float | None:
        remaining = getattr(self._context, "time_remaining", None)
        if not callable(remaining):
            return None
        try:
            value = remaining()
        except Exception:
            return None
        return None if value is None else float(value)

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
        """Raise if the request must stop: Unavailable, DeadlineExceeded or ClientGone."""
        if self.server_cancelled.is_set():
            raise Unavailable(CANCELLED_AT_SHUTDOWN)
        remaining = self.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed")
        if not self.is_active():
            raise ClientGone()


# --------------------------------------------------------------------------- admission


class _Ticket:
    """A request's place in the queue, through its states (changed under the Admission lock):
    WAITING in the queue; GRANTED a released slot, not yet taken up; HELD by the running
    request; WITHDRAWN because its call ended first."""

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state = "WAITING"


class Admission:
    """At most `max_concurrency` generations at once, at most `max_queue` waiting, FIFO.

    A request that finds the queue full is refused at once: under overload a fast
    UNAVAILABLE lets the client back off or try another instance, a long wait does not.
    A released slot is handed straight to the head of the queue, under the lock: a slot is
    never free while requests wait, so a newcomer is never refused (or let in ahead of the
    queue) in the moment between a release and the waiter waking up.
    """

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_queue = max(0, int(max_queue))
        self._cond = threading.Condition()
        self._active = 0
        self._queue: deque[_Ticket] = deque()
        self._closed = False

    @property
    def active(self) -> int:
        with self._cond:
            return self._active

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextmanager
    def slot(self, queue_timeout_s: float, control: CallControl) -> Iterator[None]:
        """Hold a generation slot for the block."""
        self._acquire(queue_timeout_s, control)
        try:
            yield
        finally:
            self._release()

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    def close(self) -> None:
        """Refuse new requests and wake the waiting ones, which then give up."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0 and not self._queue, timeout)

    def _acquire(self, queue_timeout_s: float, control: CallControl) -> None:
        started = time.monotonic()
        ticket = _Ticket()
        with self._cond:
            self._raise_if_closed()
            if self._active < self.max_concurrency:  # a free slot means nobody waits
                self._active += 1
                return
            if len(self._queue) >= self.max_queue:
                raise Unavailable(
                    f"server busy: {self._active} generations running, {len(self._queue)} waiting "
                    f"(max_concurrency={self.max_concurrency}, max_queue={self.max_queue}); retry later"
                )
            self._queue.append(ticket)
        unregister = control.on_end(lambda: self._withdraw(ticket))
        try:
            self._wait_for_turn(ticket, started, queue_timeout_s, control)
        except BaseException:
            with self._cond:
                self._give_up(ticket)
            raise
        finally:
            unregister()

    def _withdraw(self, ticket: _Ticket) -> None:
        """The call of a waiting request ended: its place goes at once, not when its thread
        next wakes (a slot already handed to it is passed on)."""
        with self._cond:
            if ticket.state != "HELD":
                self._give_up(ticket)

    def _give_up(self, ticket: _Ticket) -> None:
        """Leave the queue, or pass on a slot handed over but not taken up (lock held)."""
        if ticket.state == "WAITING" and ticket in self._queue:
            self._queue.remove(ticket)
            self._cond.notify_all()  # wait_idle may be waiting for the queue to empty
        elif ticket.state == "GRANTED":
            self._release_locked()
        ticket.state = "WITHDRAWN"

    def _wait_for_turn(self, ticket: _Ticket, started: float, queue_timeout_s: float, control: CallControl) -> None:
        while True:
            with self._cond:
                self._raise_if_closed()  # before taking a slot: one handed over now is passed on
                if ticket.state == "WITHDRAWN":
                    raise ClientGone()
                if ticket.state == "GRANTED":
                    ticket.state = "HELD"
                    return
                self._cond.wait(_WAIT_SLICE_S)
            # Checked outside our lock: the context takes grpc's own lock. A deadline that
            # passes while waiting answers DEADLINE_EXCEEDED from here.
            control.check()
            waited = time.monotonic() - started
            if waited >= queue_timeout_s:
                raise Unavailable(f"no generation slot became free within {queue_timeout_s:g} s; retry later")

    def _release(self) -> None:
        with self._cond:
            self._release_locked()

    def _release_locked(self) -> None:
        """Free a slot, or hand it to the head of the queue (the count stays the same)."""
        if self._queue:
            self._queue.popleft().state = "GRANTED"
        else:
            self._active -= 1
        self._cond.notify_all()

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down")
