"""First in, first out: only insertion order counts; a hit changes nothing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

from cache_policies.policy import CachePolicy


class FIFO(CachePolicy):
    name = "fifo"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest insertion first

    def hit(self, key: int) -> None:
        pass

    def insert(self, key: int) -> None:
        self._order[key] = None

    def evict(self, protected: Container[int]) -> int:
        for key in self._order:
            if key not in protected:
                del self._order[key]
                return key
        raise RuntimeError("every resident key is protected; the cache is smaller than one access")
