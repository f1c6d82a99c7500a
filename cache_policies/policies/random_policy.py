"""Random eviction, seeded: the victim is a uniformly random unprotected resident key.

The baseline every policy must beat. The seed makes a run reproducible: the same seed and the same access
sequence give the same victims, in the simulator and in the runtime.
"""

from __future__ import annotations

import random
from collections.abc import Container

from cache_policies.policy import CachePolicy


class RandomPolicy(CachePolicy):
    name = "random"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity)
        self._rng = random.Random(seed)
        self._keys: list[int] = []  # resident keys, in no particular order
        self._index: dict[int, int] = {}  # key -> position in _keys, for O(1) removal

    def hit(self, key: int) -> None:
        pass

    def insert(self, key: int) -> None:
        self._index[key] = len(self._keys)
        self._keys.append(key)

    def evict(self, protected: Container[int]) -> int:
        keys, rng = self._keys, self._rng
        # Rejection sampling: at most one access's keys are protected, so a few draws suffice; the bounded
        # loop falls back to an explicit candidate list when nearly everything is protected.
        for _ in range(32):
            victim = keys[rng.randrange(len(keys))] if keys else -1
            if victim >= 0 and victim not in protected:
                break
        else:
            candidates = [key for key in keys if key not in protected]
            if not candidates:
                raise RuntimeError("every resident key is protected; the cache is smaller than one access")
            victim = candidates[rng.randrange(len(candidates))]
        position = self._index.pop(victim)
        last = keys.pop()
        if last != victim:  # swap-remove: move the last key into the victim's place
            keys[position] = last
            self._index[last] = position
        return victim
