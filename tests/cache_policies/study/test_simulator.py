"""The simulator: counting, waves, the timing model, and the LRU fast path against the generic cache path."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cache_policies import (
    AccessSequence,
    ExpertCache,
    RoutingTrace,
    TimingModel,
    make_policy_factory,
    simulate,
)
from cache_policies.study.fast_lru import replay_lru


def random_trace(seed: int, layers: int = 3, experts: int = 12, k: int = 3, steps: int = 120) -> RoutingTrace:
    """Decode steps mixed with prefill steps of up to 6 tokens (which need waves in a small cache)."""
    rng = random.Random(seed)
    hot = list(range(experts // 3))
    per_step = []
    for _ in range(steps):
        tokens = 1 if rng.random() < 0.7 else rng.randint(2, 6)
        step = np.zeros((tokens, layers, k), dtype=np.int64)
        for t in range(tokens):
            for layer in range(layers):
                # skewed: some experts are hot, as with real routers
                pool = hot + list(range(experts)) if rng.random() < 0.5 else list(range(experts))
                chosen: list[int] = []
                while len(chosen) < k:
                    e = rng.choice(pool)
                    if e not in chosen:
                        chosen.append(e)
                step[t, layer] = chosen
        per_step.append(step)
    return RoutingTrace.from_steps(per_step, num_experts=experts)


# -- access sequences -----------------------------------------------------------------------------------------
def test_access_sequence_is_distinct_ascending_experts_per_step_and_layer() -> None:
    ids = np.array([[[3, 1], [0, 2]], [[1, 0], [2, 0]], [[2, 1], [1, 3]]])  # 3 tokens, 2 layers, top-2
    trace = RoutingTrace(ids, np.array([0, 2, 3]), 4)  # step 0: tokens 0-1, step 1: token 2
    seq = AccessSequence.from_trace(trace)
    assert seq.layers == [0, 1, 0, 1]
    assert seq.experts == [[0, 1, 3], [0, 2], [1, 2], [1, 3]]
    assert seq.keys == [[0, 1, 3], [4, 6], [1, 2], [5, 7]]
    assert seq.expert_accesses == 9
    assert seq.future == {0: [0], 1: [0, 2], 3: [0], 4: [1], 6: [1], 2: [2], 5: [3], 7: [3]}


# -- waves --------------------------------------------------------------------------------------------------
def test_waves_when_a_layer_needs_more_experts_than_its_slots() -> None:
    cache = ExpertCache(1, 8, 3, make_policy_factory("lru"), scope="layer")
    cache.access(0, [1])  # 1 -> slot 0
    plan = cache.access(0, [0, 1, 2, 3, 4, 5, 6])
    assert (plan.hits, plan.misses) == (1, 6)
    w1, w2, w3 = plan.waves
    # first wave: every resident expert (1) plus as many misses as fit, ascending
    assert (w1.experts, w1.slots, w1.loads, w1.evicted) == ([0, 1, 2], [1, 0, 2], [0, 2], [])
    # later waves evict earlier waves' experts (their compute is done), LRU order: 1, 0, 2, then 3
    assert (w2.experts, w2.slots, w2.loads, w2.evicted) == (
        [3, 4, 5],
        [0, 1, 2],
        [0, 1, 2],
        [(0, 1), (0, 0), (0, 2)],
    )
    assert (w3.experts, w3.slots, w3.loads, w3.evicted) == ([6], [0], [0], [(0, 3)])
    assert cache.resident() == {(0, 4): 1, (0, 5): 2, (0, 6): 0}
    assert (cache.hits, cache.misses, cache.evictions) == (1, 7, 4)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "random", "lfru"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_waves_invariants_for_every_policy(policy: str, scope: str) -> None:
    trace = random_trace(5)
    seq = AccessSequence.from_trace(trace)
    capacity = 4 if scope == "layer" else 7
    cache = ExpertCache(3, 12, capacity, make_policy_factory(policy), scope=scope)  # type: ignore[arg-type]
    for layer, experts in zip(seq.layers, seq.experts, strict=True):
        plan = cache.access(layer, experts)
        seen = [e for w in plan.waves for e in w.experts]
        assert sorted(seen) == experts and len(seen) == len(experts)  # every expert once
        for wave in plan.waves:
            assert len(wave.experts) <= capacity and wave.experts == sorted(wave.experts)
            assert len(set(wave.slots)) == len(wave.slots)  # no two experts of a wave share a slot
            assert not {e for (lay, e) in wave.evicted if lay == layer} & set(wave.experts)
            assert all(lay == layer or scope == "global" for (lay, _) in wave.evicted)
        if len(plan.waves) == 1:  # a single wave never evicts this access's experts
            assert not {e for (lay, e) in plan.waves[0].evicted if lay == layer} & set(experts)
        for expert in plan.waves[-1].experts:
            assert cache.slot_of(layer, expert) is not None
        assert len(cache.resident()) <= cache.slots


# -- the LRU fast path makes the generic path's decisions -------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope,capacity", [("layer", 3), ("layer", 5), ("global", 4), ("global", 10)])
def test_fast_lru_matches_the_generic_cache(seed: int, scope: str, capacity: int) -> None:
    seq = AccessSequence.from_trace(random_trace(seed))
    cache = ExpertCache(3, 12, capacity, make_policy_factory("lru"), scope=scope)  # type: ignore[arg-type]
    generic = [cache.access(layer, ex).misses for layer, ex in zip(seq.layers, seq.experts, strict=True)]
    fast, evictions, parts = replay_lru(seq, capacity, scope)  # type: ignore[arg-type]
    assert fast == generic  # access by access
    assert evictions == cache.evictions
    assert {key for part in parts for key in part} == {
        layer * 12 + e for (layer, e) in cache.resident()
    }  # and the same experts resident at the end
    assert any(len(ex) > capacity for ex in seq.experts)  # the trace did exercise waves


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_simulate_fast_and_generic_agree(scope: str) -> None:
    seq = AccessSequence.from_trace(random_trace(9))
    capacity = 4 if scope == "layer" else 9
    fast = simulate(seq, "lru", capacity, scope)  # type: ignore[arg-type]
    slow = simulate(seq, "lru", capacity, scope, fast=False)  # type: ignore[arg-type]
    assert fast == slow


# -- counts and the timing model -------------------------------------------------------------------------------
def two_step_trace(expert_bytes: int | None = 2_000_000) -> RoutingTrace:
    ids = np.array([[[0, 1]], [[0, 2]]])  # 2 decode steps, 1 layer, top-2
    return RoutingTrace(ids, np.arange(3), 4, expert_bytes=expert_bytes)


def test_counts_and_bytes() -> None:
    r = simulate(two_step_trace(), "lru", 4)
    assert (r.accesses, r.hits, r.misses, r.evictions) == (4, 1, 3, 0)
    assert r.hit_rate == 0.25 and r.bytes_moved == 6_000_000
    assert (r.steps, r.tokens, r.layer_accesses, r.capacity, r.slots) == (2, 2, 2, 4, 4)
    assert r.tokens_per_s is None and r.stall_fraction is None


def test_timing_model_demand_paging_without_overlap() -> None:
    # 2 layer accesses x 1 ms compute + 3 misses x 2 MB / 1 GB/s (2 ms each) = 8 ms for 2 tokens
    r = simulate(two_step_trace(), "lru", 4, timing=TimingModel(bandwidth_gbps=1.0, compute_s_per_layer=1e-3))
    assert r.seconds == pytest.approx(8e-3) and r.stall_seconds == pytest.approx(6e-3)
    assert r.tokens_per_s == pytest.approx(250.0)
    assert r.stall_fraction == pytest.approx(0.75)


def test_timing_model_needs_the_expert_size_and_sane_numbers() -> None:
    with pytest.raises(ValueError, match="expert size"):
        simulate(two_step_trace(None), "lru", 4, timing=TimingModel(10.0, 1e-3))
    r = simulate(two_step_trace(None), "lru", 4, timing=TimingModel(10.0, 1e-3), expert_bytes=10**9)
    assert r.stall_seconds == pytest.approx(0.3)
    for bad in ((0.0, 1e-3), (-1.0, 1e-3), (math.inf, 1e-3), (1.0, -1.0), (1.0, math.nan)):
        with pytest.raises(ValueError):
            TimingModel(*bad)


def test_capacity_is_clamped_to_what_a_partition_can_hold() -> None:
    r = simulate(two_step_trace(), "fifo", 100, "layer")
    assert (r.capacity, r.slots, r.misses) == (4, 4, 3)
    assert simulate(two_step_trace(), "lru", 100, "layer").capacity == 4


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown cache policy"):
        simulate(two_step_trace(), "nope", 4)
