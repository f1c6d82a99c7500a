"""Least frequently used, with counts that survive eviction.

A key's count is every use since the start, resident or not (``use`` counts the demand misses, ``hit`` the
hits), so an expert that was popular long ago keeps its rank after being evicted once. The victim is the
unprotected resident key with the smallest count; ties go to the oldest insertion. A min-heap of
``(count, insertion)`` entries finds it in O(log n); an entry goes stale when its key's count grows or the
key leaves, and is skipped instead of being updated in place.
"""

from __future__ import annotations

import heapq
from collections.abc import Container

from cache_policies.policy import CachePolicy

Entry = tuple[int, int, int]  # (count, insertion number, key)


class LFU(CachePolicy):
    name = "lfu"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._count: dict[int, int] = {}  # every key ever used -> uses since the start
        self._live: dict[int, Entry] = {}  # resident key -> its one current heap entry
        self._heap: list[Entry] = []  # may hold stale entries
        self._inserts = 0

    def use(self, key: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1

    def hit(self, key: int) -> None:
        count = self._count[key] + 1
        self._count[key] = count
        self._push((count, self._live[key][1], key))

    def insert(self, key: int) -> None:
        self._inserts += 1
        self._push((self._count.setdefault(key, 0), self._inserts, key))

    def _push(self, entry: Entry) -> None:
        self._live[entry[2]] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._live) + 64:  # drop stale entries now and then
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def evict(self, protected: Container[int]) -> int:
        heap, live = self._heap, self._live
        skipped = []
        try:
            while heap:
                entry = heapq.heappop(heap)
                key = entry[2]
                if live.get(key) != entry:
                    continue  # stale
                if key in protected:
                    skipped.append(entry)
                    continue
                del live[key]
                return key
            raise RuntimeError("every resident key is protected; the cache is smaller than one access")
        finally:
            for entry in skipped:
                heapq.heappush(heap, entry)
