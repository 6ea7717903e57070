"""Who may run now: `max_concurrency` batch slots, a bounded FIFO queue, and its timeout.

Plain bookkeeping under the engine's lock (the caller holds it for every method): no
threads, no model, no protocol. A slot freed while requests wait is handed straight to the
head of the queue, so a slot is never idle while anyone waits and a newcomer never jumps
the queue.
"""

from __future__ import annotations

from collections import deque

from .errors import SHUTTING_DOWN, DeadlineExceeded, Overloaded, Unavailable
from .handle import RequestHandle


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.active = 0  # requests holding a slot: preparing, prefilling or decoding
        self.waiting: deque[tuple[RequestHandle, float]] = deque()  # with the time each joined
        self.closed = False

    def offer(self, handle: RequestHandle, now: float) -> bool:
        """True: `handle` holds a slot now. False: it waits. Unavailable: refused at once (under
        overload a fast refusal lets a client back off or try another instance)."""
        if self.closed:
            raise Unavailable(SHUTTING_DOWN)
        if self.active < self.max_concurrency:
            self.active += 1
            return True
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(
                f"server busy: {self.active} generations running, {len(self.waiting)} waiting "
                f"(max_concurrency={self.max_concurrency}, max_queue={self.max_queue}); retry later"
            )
        self.waiting.append((handle, now))
        return False

    def release(self) -> RequestHandle | None:
        """A slot is free: the request it goes to (the head of the queue), or None."""
        if self.waiting:
            return self.waiting.popleft()[0]
        self.active -= 1
        return None

    def withdraw(self, handle: RequestHandle) -> bool:
        """Take a waiting request out of the queue; False if it was not waiting."""
        for entry in self.waiting:
            if entry[0] is handle:
                self.waiting.remove(entry)
                return True
        return False

    def expired(self, now: float, monotonic_now: float) -> list[tuple[RequestHandle, Exception]]:
        """Waiting requests that must give up now (removed from the queue), with their error."""
        gone: list[tuple[RequestHandle, Exception]] = []
        for handle, joined in list(self.waiting):
            if handle.past_deadline(monotonic_now):
                gone.append((handle, DeadlineExceeded("the request's deadline passed while it waited for a slot")))
            elif now - joined >= self.queue_timeout_s:
                gone.append(
                    (
                        handle,
                        Overloaded(f"no generation slot became free within {self.queue_timeout_s:g} s; retry later"),
                    )
                )
        for handle, _ in gone:
            self.withdraw(handle)
        return gone

    def close(self) -> list[RequestHandle]:
        """Refuse new requests; the waiting ones are returned to be answered, and leave."""
        self.closed = True
        waiting = [handle for handle, _ in self.waiting]
        self.waiting.clear()
        return waiting

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self.waiting
