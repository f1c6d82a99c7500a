"""First in, first out: only insertion order counts; a hit changes nothing. LRU without the refresh."""

from __future__ import annotations

from cache_policies.policies.lru import LRU


class FIFO(LRU):
    name = "fifo"

    def hit(self, key: int) -> None:
        pass  # the order stays the insertion order
