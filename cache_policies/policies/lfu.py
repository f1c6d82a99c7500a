"""Least frequently used, with counts that survive eviction.

A key's count is every use since the start, resident or not (``use`` counts the demand misses, ``hit`` the
hits), so an expert that was popular long ago keeps its rank after being evicted once. The victim is the
unprotected resident key with the smallest count; ties go to the oldest insertion. A min-heap of
``(count, insertion)`` entries finds it in O(log n); an entry goes stale when its key's count grows or the
key leaves, and is skipped instead of being updated in place.
"""

from __future__ import annotations

from collections.abc import Container

from cache_policies.policies.lazy_heap import LazyHeap
from cache_policies.policy import CachePolicy


class LFU(CachePolicy):
    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._count: dict[int, int] = {}  # every key ever used -> uses since the start
        self._resident = LazyHeap()  # rank: (count, insertion number)
        self._inserts = 0

    def use(self, key: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1

    def hit(self, key: int) -> None:
        count = self._count[key] + 1
        self._count[key] = count
        self._resident.push(key, (count, self._resident.rank(key)[1]))

    def insert(self, key: int) -> None:
        self._inserts += 1
        self._resident.push(key, (self._count.setdefault(key, 0), self._inserts))

    def evict(self, protected: Container[int]) -> int:
        return self._resident.pop(protected)
