"""Belady's MIN, the offline optimum: evict the key whose next use is farthest in the future.

It needs the whole future, so it runs only in the simulator (``online = False``): no online policy can beat
its hit rate without prefetching. ``future`` maps each key to the ascending access times at which it is used,
in the clock of :meth:`CachePolicy.begin_access` (one tick per layer access, counted over the whole cache;
:func:`cache_policies.access.future_uses` builds it from a trace).

Ties: within one layer access experts are touched in ascending id order, so of two keys next used in the same
access the larger key (the larger expert id) is needed later. The next use is compared as ``(time, key)``,
and keys never used again (time = infinity) are evicted largest key first. On the shared reference traces
any order among the never-used-again keys gives the same hit rate, as it must for MIN.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Mapping, Sequence

from cache_policies.policy import CachePolicy

_NEVER = 1 << 62  # the next-use time of a key that is not used again

Entry = tuple[int, int]  # (-next use, -key): heapq is a min-heap, MIN wants the largest (next use, key)


class Belady(CachePolicy):
    name = "belady"
    online = False

    def __init__(self, capacity: int, future: Mapping[int, Sequence[int]]) -> None:
        super().__init__(capacity)
        self._future = future
        self._cursor: dict[int, int] = {}  # key -> index into future[key] of its next use
        self._live: dict[int, Entry] = {}  # resident key -> its one current heap entry
        self._heap: list[Entry] = []  # may hold stale entries (an older use of a key, or an evicted key)
        self._now = 0

    def begin_access(self, now: int) -> None:
        self._now = now

    def _schedule(self, key: int) -> None:
        """The key is used now: find its next use after now and push a fresh heap entry."""
        times = self._future.get(key, ())
        i = self._cursor.get(key, 0)
        while i < len(times) and times[i] <= self._now:
            i += 1
        self._cursor[key] = i
        entry = (-(times[i] if i < len(times) else _NEVER), -key)
        self._live[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._live) + 64:  # drop stale entries now and then
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def hit(self, key: int) -> None:
        self._schedule(key)

    def insert(self, key: int) -> None:
        self._schedule(key)

    def evict(self, protected: Container[int]) -> int:
        heap, live = self._heap, self._live
        skipped = []
        try:
            while heap:
                entry = heapq.heappop(heap)
                key = -entry[1]
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
