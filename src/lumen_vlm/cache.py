"""A thread-safe least-recently-used cache bounded by the bytes of what it holds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteBudgetLRU(Generic[V]):
    """Keeps the most recently used values whose sizes add up to at most `max_bytes`.

    A value larger than the whole budget is simply not kept. `max_bytes` 0 disables the cache.
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._computing: dict[Hashable, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        return self._lookup(key, count=True)

    def _lookup(self, key: Hashable, count: bool) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += count
                return None
            self._items.move_to_end(key)
            self.hits += count
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self._size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The cached value, else `compute()`'s, kept. Concurrent callers for one key wait for a
        single computation instead of each repeating it (a photo asked about twice at once)."""
        value = self.get(key)
        if value is not None:
            return value
        with self._lock:
            key_lock = self._computing.setdefault(key, threading.Lock())
        try:
            with key_lock:
                value = self._lookup(key, count=False)  # computed by the caller we waited for
                if value is None:
                    value = compute()
                    self.put(key, value)
                return value
        finally:
            with self._lock:
                self._computing.pop(key, None)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
