"""The prefetch protocol (cache_policies.prefetch), step by step: observe, guess (after a multi-wave access,
for the next layer behind its last wave), reserve slots through the cache, and count used / late / wasted from
what ``landed`` says."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cache_policies import ExpertCache, Guess, HistoryPredictor, Prefetcher, make_policy_factory
from cache_policies.guess_score import GuessScore


class Scripted:
    """A predictor that records what it saw and guesses what it is told."""

    name = "scripted"

    def __init__(self, guesses: dict[int, Guess | None]) -> None:
        self.guesses = guesses
        self.observed: list[tuple[int, tuple[int, ...]]] = []
        self.asked: list[tuple[int, int, Any]] = []

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self.observed.append((layer, tuple(experts)))

    def guess(self, layer: int, count: int, hint: Any) -> Guess | None:
        self.asked.append((layer, count, hint))
        return self.guesses.get(layer)


def cache(capacity: int) -> ExpertCache:
    return ExpertCache(2, 8, capacity, make_policy_factory("lru"), scope="global")


def test_observe_guess_reserve_and_count() -> None:
    c = cache(4)
    predictor = Scripted({0: Guess(1, [5, 6]), 1: None})
    prefetcher = Prefetcher(c, predictor, top_k=2)
    plan = c.access(0, [0, 1])
    prefetcher.settle(plan, landed=lambda e: True)
    prefetch = prefetcher.after_access(0, [0, 1], plan, hint="hidden")
    assert predictor.observed == [(0, (0, 1))] and predictor.asked == [(0, 2, "hidden")]
    assert prefetch is not None and (prefetch.layer, prefetch.experts) == (1, [5, 6])
    assert prefetcher.issued == 2 and c.slot_of(1, 5) is not None
    plan = c.access(1, [5, 7])  # 5 was prefetched; its copy is still in flight: late
    prefetcher.settle(plan, landed=lambda e: e != 5)
    assert plan.prefetched == [5] and (prefetcher.used, prefetcher.late) == (0, 1)
    assert prefetcher.after_access(1, [5, 7], plan) is None  # the predictor had nothing for layer 1
    plan = c.access(0, [2, 3])  # evicts the unused prefetch of (1, 6) among others
    assert prefetcher.wasted == 1


def test_after_a_multi_wave_access_the_next_layer_is_copied_behind_the_last_wave() -> None:
    """A prefill chunk with more experts than slots: the next layer's guess (the predictor's where it names that
    layer, else all of its experts) goes into the slots the last wave leaves free; never after the last layer."""
    c = cache(2)
    predictor = Scripted({0: Guess(1, [0])})
    prefetcher = Prefetcher(c, predictor, top_k=2)
    plan = c.access(0, [0, 1, 2])  # three experts, two slots: two waves
    assert len(plan.waves) == 2 and plan.waves[-1].experts == [2]
    prefetch = prefetcher.after_access(0, [0, 1, 2], plan)
    assert predictor.observed == [(0, (0, 1, 2))] and predictor.asked == [(0, 8, None)]  # count: every expert
    assert prefetch is not None and (prefetch.layer, prefetch.experts) == (1, [0])
    assert c.slot_of(0, 2) is not None and prefetch.slots != [c.slot_of(0, 2)]  # the last wave keeps its slot
    predictor.guesses = {}  # nothing from the predictor: every expert of the next layer, as many as fit
    plan = c.access(0, [3, 4, 5])  # evicts the prefetched (1, 0) unused: its waves need both slots
    prefetch = prefetcher.after_access(0, [3, 4, 5], plan)
    assert prefetch is not None and (prefetch.layer, prefetch.experts) == (1, [0])  # the first, in one slot
    assert prefetch.evicted == [(0, 4)] and prefetch.slots != [c.slot_of(0, 5)]  # not the last wave's
    plan = c.access(1, [4, 5, 6])  # the last layer: its next step starts over at layer 0
    assert len(plan.waves) == 2 and prefetcher.after_access(1, [4, 5, 6], plan) is None
    plan = c.access(1, [7])
    prefetcher.settle(plan, landed=None)  # no copy timing known: nothing counts as late
    predictor.guesses = {1: Guess(1, [7])}  # already resident: nothing to copy
    assert prefetcher.after_access(1, [7], plan) is None


def test_used_in_time() -> None:
    c = cache(4)
    prefetcher = Prefetcher(c, Scripted({0: Guess(1, [3])}), top_k=1)
    plan = c.access(0, [0])
    prefetcher.after_access(0, [0], plan)
    plan = c.access(1, [3])
    prefetcher.settle(plan, landed=lambda e: True)
    assert (prefetcher.issued, prefetcher.used, prefetcher.late, prefetcher.wasted) == (1, 1, 0, 0)


def test_guess_score_counts_each_guess_against_its_layers_next_access() -> None:
    score = GuessScore(num_layers=2)
    score.access(0, [1, 2])  # no guess for it: counted, not scored
    score.guess(1, [2, 3, 5])
    score.guess(1, [2, 3])  # replaces the first guess for the same access
    score.access(1, [3, 4])  # 1 of 2 named used; 1 of 2 needed named
    score.access(1, [3, 4])  # no guess left for this one
    score.guess(0, [1, 2, 6, 7])
    score.access(0, [1, 2])
    assert score.recall(1) == 0.5 and score.precision(1) == 0.5
    assert score.recall(0) == 1.0 and score.precision(0) == 0.5
    assert score.recall() == 3 / 4 and score.precision() == 3 / 6
    assert score.coverage() == 2 / 4 and score.accesses == [2, 2] and score.scored == [1, 1]
    assert GuessScore(1).recall() is None and GuessScore(1).precision(0) is None


def test_prefetcher_scores_history_guesses() -> None:
    """A layer that always uses the same experts is guessed exactly once the history has seen it."""
    cache = ExpertCache(2, 8, 8, make_policy_factory("lru"))
    prefetcher = Prefetcher(cache, HistoryPredictor(2, window=4), top_k=2)
    for _ in range(5):
        for layer, experts in ((0, [1, 2]), (1, [3, 4])):
            plan = cache.access(layer, experts)
            prefetcher.settle(plan, None)
            prefetcher.after_access(layer, experts, plan)
    assert prefetcher.score.recall() == prefetcher.score.precision() == 1.0
    assert prefetcher.score.scored == [4, 4]  # each layer's first access came before the history had any
