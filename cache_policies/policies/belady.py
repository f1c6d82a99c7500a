"""Belady's MIN, the offline optimum: evict the key whose next use is farthest in the future.

It needs the whole future, so it runs only in the simulator (``online = False``): no online policy can beat
its hit rate without prefetching. ``future`` maps each key to the ascending access times at which it is used,
in the clock of :meth:`CachePolicy.begin_access` (one tick per layer access, counted over the whole cache;
:func:`cache_policies.study.access.future_uses` builds it from a trace).

Ties: within one layer access experts are touched in ascending id order, so of two keys next used in the same
access the larger key (the larger expert id) is needed later. The next use is compared as ``(time, key)``,
and keys never used again (time = infinity) are evicted largest key first. On the shared reference traces
any order among the never-used-again keys gives the same hit rate, as it must for MIN.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from cache_policies.policies.lazy_heap import LazyHeap
from cache_policies.policy import CachePolicy

_NEVER = 1 << 62  # the next-use time of a key that is not used again


class Belady(CachePolicy):
    name = "belady"
    online = False

    def __init__(self, capacity: int, future: Mapping[int, Sequence[int]]) -> None:
        super().__init__(capacity)
        self._future = future
        self._cursor: dict[int, int] = {}  # key -> index into future[key] of its next use
        # rank: (-next use, -key): the heap pops the smallest, MIN wants the largest (next use, key)
        self._resident = LazyHeap()
        self._now = 0

    def begin_access(self, now: int) -> None:
        self._now = now

    def _schedule(self, key: int) -> None:
        """The key is used now: find its next use after now and re-rank it."""
        times = self._future.get(key, ())
        i = self._cursor.get(key, 0)
        while i < len(times) and times[i] <= self._now:
            i += 1
        self._cursor[key] = i
        self._resident.push(key, (-(times[i] if i < len(times) else _NEVER), -key))

    def hit(self, key: int) -> None:
        self._schedule(key)

    def insert(self, key: int) -> None:
        self._schedule(key)

    def evict(self, protected: Container[int]) -> int:
        return self._resident.pop(protected)
