"""Static pinning: the experts most used in a profiling trace stay resident; a small LRU area serves the rest.

This is frequency pinning as offloading systems ship it: profile once, keep the hottest experts on the
device, and page everything else through a staging area. The partition's ``capacity`` slots are split:

- ``capacity - dynamic_slots`` slots for *pinned* keys: the most used keys of the profile, per layer with
  scope ``"layer"`` (each partition serves one layer) or over all layers with scope ``"global"``. Ties in the
  profile go to the lower key. A pinned key is loaded on its first use (there is no warm start: that would be
  a prefetch) and is then never the victim while an unpinned key can be evicted instead.
- ``dynamic_slots`` slots managed by LRU for everything else. The sensible minimum is the model's top-k: one
  token's experts in one layer must fit without unpinning anything, so the simulator passes top-k.
  More dynamic slots trade pinned hits for recency hits.

Before every pinned key has been used, unpinned keys may use the pinned keys' free slots; they are the first
victims once the partition is full. If every evictable key is pinned (an access with more unpinned experts
than dynamic slots, e.g. a prefill wave), the least-used pinned key goes, and is pinned again when it returns.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container

import numpy as np

from cache_policies.cache import Scope
from cache_policies.policy import CachePolicy


def pinned_keys(profile: np.ndarray, capacity: int, dynamic_slots: int, scope: Scope) -> dict[int, int]:
    """The keys to pin, each with its rank (0 = most used), for one partition of ``capacity`` slots.

    ``profile``: int or float [layers, experts], uses of each expert in a profiling trace. Keys are
    ``layer * experts + expert``. With scope ``"layer"`` every layer gets its own top keys (each partition
    only ever sees its own layer's keys, so it can hold the union).
    """
    if profile.ndim != 2 or profile.shape[0] < 1 or profile.shape[1] < 1:
        raise ValueError(
            f"static profile must be a [layers, experts] array of use counts, got {profile.shape}"
        )
    if not np.all(np.isfinite(profile)) or np.any(profile < 0):
        raise ValueError("static profile counts must be finite and non-negative")
    pins = max(0, capacity - dynamic_slots)
    experts = profile.shape[1]
    rows = profile if scope == "layer" else profile.reshape(1, -1)
    ranks: dict[int, int] = {}
    for row_index, row in enumerate(rows):
        order = np.argsort(-row, kind="stable")[:pins]  # most used first; stable: ties to the lower key
        base = row_index * experts if scope == "layer" else 0
        for rank, index in enumerate(order.tolist()):
            if row[index] > 0:  # never pin an expert the profile never saw
                ranks[base + index] = rank
    return ranks


class Static(CachePolicy):
    name = "static"

    def __init__(self, capacity: int, *, profile: np.ndarray, dynamic_slots: int, scope: Scope) -> None:
        super().__init__(capacity)
        if dynamic_slots < 1:
            raise ValueError(f"static needs at least one dynamic slot, got {dynamic_slots}")
        self._rank = pinned_keys(np.asarray(profile), capacity, dynamic_slots, scope)
        self._dynamic: OrderedDict[int, None] = OrderedDict()  # resident unpinned keys, least recent first
        self._pinned: dict[int, int] = {}  # resident pinned keys -> rank

    @property
    def pinned(self) -> frozenset[int]:
        """Every key this partition pins (resident or not)."""
        return frozenset(self._rank)

    def hit(self, key: int) -> None:
        if key in self._dynamic:
            self._dynamic.move_to_end(key)

    def insert(self, key: int) -> None:
        rank = self._rank.get(key)
        if rank is None:
            self._dynamic[key] = None
        else:
            self._pinned[key] = rank

    def evict(self, protected: Container[int]) -> int:
        for key in self._dynamic:
            if key not in protected:
                del self._dynamic[key]
                return key
        candidates = [(rank, key) for key, rank in self._pinned.items() if key not in protected]
        if not candidates:
            raise RuntimeError("every resident key is protected; the cache is smaller than one access")
        _, key = max(candidates)  # the least used pinned key
        del self._pinned[key]
        return key
