"""Least recently used: a hit refreshes recency; the victim is the stalest unprotected key."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Iterable

from cache_policies.policy import CachePolicy


class LRU(CachePolicy):
    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def hit(self, key: int) -> None:
        self._order.move_to_end(key)

    def hits(self, keys: Iterable[int]) -> None:
        refresh = self._order.move_to_end  # the runtime's per-layer hot path: one lookup for all keys
        for key in keys:
            refresh(key)

    def insert(self, key: int) -> None:
        self._order[key] = None

    def evict(self, protected: Container[int]) -> int:
        for key in self._order:
            if key not in protected:
                del self._order[key]
                return key
        raise RuntimeError("every resident key is protected; the cache is smaller than one access")
