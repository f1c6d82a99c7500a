"""The prefetch protocol, written once: the runtime and the simulator both run it, so a recorded run replays
with the same prefetches (invariant *same-decisions*, docs/architecture.md).

For every layer access, in order::

    prefetch = prefetcher.before_layer(layer, hint)   only a predictor that guesses a layer before it runs
        guess = predictor.guess(layer, top_k, hint)         (pre-attention: the layer's own router, before
        cache.prefetch(guess.layer, guess.experts, ...)      its attention), and its copies overlap that attention
    plan = cache.access(layer, experts)             the caller: demand hits and misses
    prefetcher.settle(plan, landed)                 the prefetched experts this access found: in time or late
    ...                                             the caller issues the access's demand copies
    prefetch = prefetcher.after_access(layer, experts, plan, hint)
        predictor.observe(layer, experts); the guess made for this access is scored (``score``)
        after a single-wave access:
        guess = predictor.guess(layer, top_k, hint)         which experts of which layer, or nothing
        cache.prefetch(guess.layer, guess.experts, running_layer=layer, running=experts)
        after a multi-wave access (a prefill chunk with more experts than slots), for the next layer:
        guess = predictor.guess(layer, experts per layer, hint) where it names the next layer, else all of
        its experts (a chunk that needs waves uses nearly all of them), ascending, as its waves load them
        cache.prefetch(layer + 1, guess, running_layer=layer, running=the last wave's experts)
    ...                                             the caller copies the prefetch in, behind the demand copies:
                                                    after a multi-wave access, once the last wave starts (its
                                                    earlier waves' slots are free then, the last wave's protected)

Under a lower tier (the RAM tier of the disk tier, :class:`LowerTier`), ``cache.prefetch`` reserves slots
only for guessed experts the lower tier holds now: their copies cannot wait on a disk read. With
``reads_ahead``, the others are handed to ``lower.read_ahead``, which starts their disk reads at once, a layer
or more before their demand copies (which then find them in RAM); without it they are left to demand.

A predictor is anything with ``observe`` and ``guess`` (:class:`Predictor`): the history predictor
(:mod:`cache_policies.predictors`) needs only routing; the runtime's router predictors need the hidden state,
passed as ``hint``. A guess steers copies only: a wrong one costs bandwidth, never correctness.

Counters: ``issued`` experts copied in by prefetches (never counted as demand misses), of which ``used``
were found resident by a demand access with their copy landed, ``late`` were found while their copy was
still in flight, and ``wasted`` were evicted before any access used them. ``landed`` tells, for an expert of
the planned layer, whether its copy has landed: the copy engine's answer in the runtime, the timing model's
in the simulator; without one (a simulation with no timing model) nothing counts as late. ``score``
(:class:`cache_policies.guess_score.GuessScore`) has each layer's recall and precision of the guesses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cache_policies.cache import AccessPlan, ExpertCache, Prefetch
from cache_policies.guess_score import GuessScore


@dataclass(frozen=True, slots=True)
class Guess:
    layer: int  # the MoE layer the experts are for
    experts: list[int]  # ascending, unique, valid expert ids


class Predictor(Protocol):
    name: str

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """Layer ``layer`` just used ``experts`` (ascending)."""

    def guess(self, layer: int, count: int, hint: Any) -> Guess | None:
        """Up to about ``count`` experts a coming layer will use, guessed while ``layer`` runs; ``hint`` is what
        the caller has (the runtime: the host copy of the ids a router predictor computed). Called after each
        access, and before each layer runs when the caller has a hint then (pre-attention); a predictor
        answers None where it has nothing to say."""


class LowerTier(Protocol):
    """The tier a cache's misses are served from, when it is itself a cache (the disk tier's RAM tier)."""

    def ready(self, layer: int, expert: int) -> bool:
        """Whether a copy of the expert could start now, without a read from the tier below."""

    def read_ahead(self, layer: int, experts: Sequence[int]) -> None:
        """Start bringing ``experts`` (ascending, none :meth:`ready`) in from the tier below; return at once."""


@dataclass(frozen=True, slots=True)
class LowerTierCounts:
    """A lower tier's cache counted as its users see it: an expert read ahead and then used was read, so it
    is a miss, not a hit (the runtime's host tier and the two-tier simulator report these)."""

    hits: int  # accesses whose expert was resident without a read started for it
    misses: int  # accesses whose expert was read (on demand, or ahead and then used)
    read_ahead: int  # reads started ahead of an access
    reads: int  # every read: demand misses and reads started ahead

    @classmethod
    def of(cls, cache: ExpertCache) -> LowerTierCounts:
        return cls(
            hits=cache.hits - cache.prefetch_hits,
            misses=cache.misses + cache.prefetch_hits,
            read_ahead=cache.prefetch_issued,
            reads=cache.misses + cache.prefetch_issued,
        )


class Prefetcher:
    """Runs a predictor against one :class:`ExpertCache` by the protocol above, and counts the outcome."""

    def __init__(
        self,
        cache: ExpertCache,
        predictor: Predictor,
        top_k: int,
        lower: LowerTier | None = None,
        reads_ahead: bool = False,
    ) -> None:
        self.cache = cache
        self.predictor = predictor
        self.top_k = top_k
        self.lower = lower
        self.reads_ahead = reads_ahead
        self.late = 0
        self.read_ahead = 0  # guessed experts handed to the lower tier instead of copied
        self.score = GuessScore(cache.num_layers)

    def settle(self, plan: AccessPlan, landed: Callable[[int], bool] | None) -> None:
        """Count the prefetched experts ``plan`` found resident whose copy had not landed yet."""
        if landed is not None and plan.prefetched:
            self.late += sum(1 for expert in plan.prefetched if not landed(expert))

    def after_access(
        self, layer: int, experts: Sequence[int], plan: AccessPlan, hint: Any = None
    ) -> Prefetch | None:
        """Observe the access, then guess and reserve slots for the guess; None when nothing is to copy."""
        self.predictor.observe(layer, experts)
        self.score.access(layer, experts)
        if len(plan.waves) != 1:
            return self._after_waves(layer, plan, hint)
        guess = self.predictor.guess(layer, self.top_k, hint)
        if guess is None:
            return None
        if guess.experts:  # an empty guess abstains (history with nothing seen yet)
            self.score.guess(guess.layer, guess.experts)
        ready = self._split(guess)
        prefetch = self.cache.prefetch(guess.layer, ready, running_layer=layer, running=experts)
        return prefetch if prefetch.experts else None

    def _after_waves(self, layer: int, plan: AccessPlan, hint: Any) -> Prefetch | None:
        """The next layer's first experts, copied while this access's last wave computes: its slots stay
        untouched, every other slot is free by then. Not scored: a structural guess, not the predictor's."""
        target = layer + 1
        if target >= self.cache.num_layers:
            return None  # the chunk's next step starts again at the first layer, maybe with one token
        guess = self.predictor.guess(layer, self.cache.num_experts, hint)
        if guess is None or guess.layer != target or not guess.experts:
            guess = Guess(target, list(range(self.cache.num_experts)))
        prefetch = self.cache.prefetch(
            target, self._split(guess), running_layer=layer, running=plan.waves[-1].experts
        )
        return prefetch if prefetch.experts else None

    def before_layer(self, layer: int, hint: Any) -> Prefetch | None:
        """Guess ``layer``'s experts before it runs (its attention has not started: no expert of the layer
        is in use, and the previous layer's kernels have released their slots) and reserve slots for them."""
        guess = self.predictor.guess(layer, self.top_k, hint)
        if guess is None:
            return None
        if guess.experts:  # an empty guess abstains (history with nothing seen yet)
            self.score.guess(guess.layer, guess.experts)
        prefetch = self.cache.prefetch(guess.layer, self._split(guess), running_layer=guess.layer)
        return prefetch if prefetch.experts else None

    def _split(self, guess: Guess) -> list[int]:
        """The guessed experts to copy now; under a lower tier, the rest (not resident here, not ready
        there) start their reads below instead, with ``reads_ahead``."""
        lower = self.lower
        if lower is None:
            return guess.experts
        ready, later = [], []
        for expert in guess.experts:
            if lower.ready(guess.layer, expert):
                ready.append(expert)
            elif self.cache.slot_of(guess.layer, expert) is None:
                later.append(expert)
        if later and self.reads_ahead:
            self.read_ahead += len(later)
            lower.read_ahead(guess.layer, later)
        return ready

    @property
    def issued(self) -> int:
        return self.cache.prefetch_issued

    @property
    def used(self) -> int:
        return self.cache.prefetch_hits - self.late

    @property
    def wasted(self) -> int:
        return self.cache.prefetch_wasted
