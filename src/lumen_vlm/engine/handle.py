"""A submitted request as its caller sees it: its events, and the way to cancel it."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

from ..fastvlm.fastvlm_model import GenerationRequest
from ..generation import Grammar
from .errors import ClientGone
from .events import GenerationEvent, GenerationResult


class RequestHandle:
    """One request's events, in order: `TextDelta`s, then a `GenerationResult`, or an error.

    Iterating yields the events and raises the error (an `EngineError`, or the model room's
    `InputError`) in place of a result. `cancel()` may be called from any thread, any number
    of times: a waiting request leaves the queue at once, a running one stops within one
    decode step, and the iteration then ends with `ClientGone`.
    """

    def __init__(
        self,
        request: GenerationRequest,
        deadline: float | None,
        on_cancel: Callable[[RequestHandle], None],
        grammar: Grammar | None = None,
    ) -> None:
        self.request = request
        self.grammar = grammar  # the request's response format, compiled
        self.deadline = deadline  # time.monotonic() value, or None
        self.submitted = time.perf_counter()
        self._on_cancel = on_cancel
        self._events: queue.SimpleQueue[GenerationEvent | BaseException] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self.cancel_reason: BaseException | None = None  # set by the engine: shutdown, deadline
        self.done = threading.Event()  # the last event was sent
        self._listener: Callable[[], None] | None = None

    # ------------------------------------------------------------------ the caller's side

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[GenerationEvent]:
        return self.watch(lambda: True, None)

    def watch(self, still_wanted: Callable[[], bool], interval_s: float | None = 0.05) -> Iterator[GenerationEvent]:
        """The events, as iterating gives them; between events, every `interval_s`, asks
        `still_wanted()`, and cancels the request when it answers no (for a caller that can
        only poll whether its client is still there)."""
        asked = time.monotonic()
        while True:
            try:
                event = self._events.get(timeout=interval_s)
            except queue.Empty:
                event = None
            if interval_s is not None and time.monotonic() - asked >= interval_s:
                asked = time.monotonic()
                if not still_wanted():
                    self.cancel()
            if event is None:
                continue
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, GenerationResult):
                return

    def poll(self) -> GenerationEvent | BaseException | None:
        """The next event (or the error, returned, not raised) if one has arrived, else None: for
        callers on an event loop, which wait for `on_event`'s call instead of blocking."""
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def on_event(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (from an engine thread: it must only schedule work, never block)
        after every event from now on, and once now, for an event that may already be waiting."""
        self._listener = listener
        listener()

    def result(self) -> GenerationResult:
        """Wait for the end and return only the result (raising the error, if it failed)."""
        for event in self:
            if isinstance(event, GenerationResult):
                return event
        raise ClientGone("the request ended without a result")  # pragma: no cover - iteration contract

    # ------------------------------------------------------------------ the engine's side

    def send(self, event: GenerationEvent) -> None:
        self._events.put(event)
        if isinstance(event, GenerationResult):
            self.done.set()
        self._notify()

    def fail(self, error: BaseException) -> None:
        self._events.put(error)
        self.done.set()
        self._notify()

    def _notify(self) -> None:
        listener = self._listener
        if listener is not None:
            listener()

    def past_deadline(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
