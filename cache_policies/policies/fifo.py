"""First in, first out: only insertion order counts; a hit changes nothing. LRU without the refresh."""

from __future__ import annotations

from collections.abc import Iterable

from cache_policies.policies.lru import LRU


class FIFO(LRU):
    name = "fifo"

    def hit(self, key: int) -> None:
        pass  # the order stays the insertion order

    def hits(self, keys: Iterable[int]) -> None:
        pass
