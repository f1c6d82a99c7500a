"""The eviction-policy interface: a policy only chooses victims, it never owns slots or tensors.

A policy sees integer keys (the cache encodes ``(layer, expert)`` as ``layer * experts + expert``) and three
events: a resident key was used (``hit``), a key became resident (``insert``), and a victim is needed
(``evict``). Everything else (slots, waves, counters) lives in :class:`cache_policies.cache.ExpertCache`, so
the simulator and the runtime drive policies through the same code and make the same decisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Container, Iterable
from typing import ClassVar


class CachePolicy(ABC):
    """Bookkeeping over the keys resident in one cache partition of ``capacity`` slots."""

    name: ClassVar[str]
    #: False for policies that need the future (Belady): the simulator can run them, the runtime cannot.
    online: ClassVar[bool] = True

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1 slot, got {capacity}")
        self.capacity = capacity

    def begin_access(self, now: int) -> None:  # noqa: B027 - optional hook, most policies ignore time
        """Called before each layer access; ``now`` counts layer accesses from 0."""

    @abstractmethod
    def hit(self, key: int) -> None:
        """A resident key was used."""

    def hits(self, keys: Iterable[int]) -> None:
        """Resident keys were used, in this order: :meth:`hit` for each (a policy may do it in one go)."""
        for key in keys:
            self.hit(key)

    @abstractmethod
    def insert(self, key: int) -> None:
        """A key became resident (a demand miss or a prefetch)."""

    @abstractmethod
    def evict(self, protected: Container[int]) -> int:
        """Choose a resident key not in ``protected``, forget it, and return it."""

    def use(self, key: int) -> None:  # noqa: B027 - optional hook
        """A key was used while it was not resident (frequency policies count every use)."""
