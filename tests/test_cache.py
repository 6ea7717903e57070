"""The byte-bounded LRU behind the image-feature and prefix KV caches."""

from __future__ import annotations

from lumen_vlm.cache import ByteBudgetLRU


def test_evicts_least_recently_used_by_bytes() -> None:
    cache: ByteBudgetLRU[bytes] = ByteBudgetLRU(10, len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # "a" is now the most recent
    cache.put("c", b"1234")  # 12 bytes > 10: the least recent ("b") goes
    assert cache.get("b") is None
    assert cache.get("a") == b"1234" and cache.get("c") == b"1234"
    assert cache.bytes_used == 8 and len(cache) == 2


def test_a_value_larger_than_the_budget_is_not_kept() -> None:
    cache: ByteBudgetLRU[bytes] = ByteBudgetLRU(3, len)
    cache.put("big", b"1234")
    assert cache.get("big") is None and cache.bytes_used == 0


def test_replacing_a_key_counts_its_bytes_once() -> None:
    cache: ByteBudgetLRU[bytes] = ByteBudgetLRU(10, len)
    cache.put("a", b"12345678")
    cache.put("a", b"12")
    assert cache.bytes_used == 2


def test_zero_budget_disables() -> None:
    cache: ByteBudgetLRU[bytes] = ByteBudgetLRU(0, len)
    cache.put("a", b"x")
    assert cache.get("a") is None
    assert (cache.hits, cache.misses) == (0, 1)


def test_concurrent_callers_share_one_computation() -> None:
    import threading
    import time

    cache: ByteBudgetLRU[bytes] = ByteBudgetLRU(100, len)
    calls = 0
    started = threading.Event()

    def slow_compute() -> bytes:
        nonlocal calls
        calls += 1
        started.set()
        time.sleep(0.2)  # long enough for the other callers to arrive and wait
        return b"value"

    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_compute("k", slow_compute))) for _ in range(4)
    ]
    threads[0].start()
    started.wait(10)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == [b"value"] * 4
    assert calls == 1


def test_get_or_compute_with_no_budget_computes_each_time() -> None:
    cache: ByteBudgetLRU[bytes] = ByteBudgetLRU(0, len)
    assert cache.get_or_compute("k", lambda: b"a") == b"a"
    assert cache.get_or_compute("k", lambda: b"b") == b"b"
