"""Resident keys in a min-heap by a rank, updated lazily: the victim search of LFU, LRFU and Belady.

Re-ranking a key pushes a new entry instead of moving the old one; stale entries (an older rank, or a key
that left) are skipped when they surface, and dropped in bulk when they outnumber the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Container
from typing import Any

Rank = tuple[Any, ...]


class LazyHeap:
    def __init__(self) -> None:
        self._live: dict[int, tuple[Rank, int]] = {}  # resident key -> its one current entry
        self._heap: list[tuple[Rank, int]] = []  # may hold stale entries

    def rank(self, key: int) -> Rank:
        """The current rank of a resident key."""
        return self._live[key][0]

    def push(self, key: int, rank: Rank) -> None:
        """Make ``key`` resident with ``rank``, or re-rank it; the smallest rank is the next victim."""
        entry = (rank, key)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._live) + 64:  # drop stale entries now and then
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def pop(self, protected: Container[int]) -> int:
        """Remove and return the lowest-ranked resident key not in ``protected``."""
        heap, live = self._heap, self._live
        skipped = []
        try:
            while heap:
                entry = heapq.heappop(heap)
                key = entry[1]
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
