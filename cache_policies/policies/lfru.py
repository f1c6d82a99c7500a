"""LRFU (Lee et al., IEEE Trans. Computers 2001): one score that spans LFU and LRU.

Every use of a key adds 1 to its *combined recency and frequency* (CRF), and the CRF decays by half every
``half_life`` layer accesses (the clock of :meth:`CachePolicy.begin_access`):

    CRF(key, now) = sum over past uses t of 2 ** (-(now - t) / half_life)

The victim is the unprotected resident key with the smallest CRF; ties go to the oldest insertion. A very
long half-life makes it LFU (every use counts forever), a half-life of well under one access makes it LRU
(the last use dominates). Like our LFU, the history of every key is kept, resident or not.

All CRFs decay at the same rate, so their order only changes when a key is used. The heap therefore stores a
time-independent score, ``log2 CRF(key, t_last) + t_last / half_life``, updated on each use:
``score' = now/h + log2(1 + 2 ** (score - now/h))``.

Default half-life: 256 layer accesses, i.e. 16 decode tokens of a 16-layer model or 32 of an 8-layer one
(chosen a priori: a few tens of tokens, long enough to see which experts a passage favours, short enough to
follow a change of topic). docs/policy-results.md reports a sweep of the half-life on the shared traces.
"""

from __future__ import annotations

import math
from collections.abc import Container

from cache_policies.policies.lazy_heap import LazyHeap
from cache_policies.policy import CachePolicy


class LFRU(CachePolicy):
    name = "lfru"

    def __init__(self, capacity: int, half_life: float = 256.0) -> None:
        super().__init__(capacity)
        if not half_life > 0 or math.isinf(half_life):
            raise ValueError(f"lfru half_life must be a positive number of layer accesses, got {half_life}")
        self.half_life = float(half_life)
        self._score: dict[int, float] = {}  # every key ever used -> score (see the module docstring)
        self._resident = LazyHeap()  # rank: (score, insertion number)
        self._clock = 0.0  # now / half_life
        self._inserts = 0

    def begin_access(self, now: int) -> None:
        self._clock = now / self.half_life

    def _bump(self, key: int) -> float:
        clock = self._clock
        old = self._score.get(key)
        # log2(1 + 2**x) without overflow: x <= log2 of the CRF, which is bounded by 1/(1 - 2**(-1/h)).
        score = clock if old is None else clock + math.log2(1.0 + 2.0 ** (old - clock))
        self._score[key] = score
        return score

    def use(self, key: int) -> None:
        self._bump(key)

    def hit(self, key: int) -> None:
        self._resident.push(key, (self._bump(key), self._resident.rank(key)[1]))

    def insert(self, key: int) -> None:
        # After a demand miss, use() has just scored the key. A key inserted without a use (a prefetch) ranks
        # at least as if used now, so it is not the first victim before its predicted use; its history is
        # not touched, so that use still counts once.
        self._inserts += 1
        self._resident.push(key, (max(self._score.get(key, self._clock), self._clock), self._inserts))

    def evict(self, protected: Container[int]) -> int:
        return self._resident.pop(protected)
