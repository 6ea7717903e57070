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
