"""History prefetch in the simulator: the protocol on hand-checked traces, counters, and the overlap timing model."""

from __future__ import annotations

import numpy as np
import pytest

from cache_policies import (
    AccessSequence,
    ExpertCache,
    HistoryPredictor,
    RoutingTrace,
    TimingModel,
    next_layer,
    simulate,
)
from cache_policies.study.simulator import CopyTimeline, policy_factory_for
from tests.cache_policies.study.test_simulator import random_trace


def cyclic_trace(expert_bytes: int | None = 1_000_000) -> RoutingTrace:
    """2 decode steps over 3 layers, top-1, always expert 0: a cycle one longer than a 2-slot global cache."""
    return RoutingTrace(np.zeros((2, 3, 1), dtype=np.int64), np.arange(3), 2, expert_bytes=expert_bytes)


# -- the protocol on hand-made traces ------------------------------------------------------------------------
def test_prefetch_hits_and_wrap_around_to_layer_0() -> None:
    # Demand LRU: the 3-layer cycle evicts exactly the key needed next, 0 hits of 6.
    none = simulate(cyclic_trace(), "lru", 2, "global")
    assert (none.hits, none.misses, none.prefetch_issued) == (0, 6, 0)
    # History: step 0 misses everywhere (layers 1 and 2 have no history when their prefetch would be issued);
    # at layer 2 the prefetch wraps to layer 0 of the next token, evicting (1, 0), not the running (2, 0).
    # From then on every access hits the expert its previous layer prefetched; the last prefetch (layer 0 of
    # a token the trace does not have) is issued, never used, never evicted.
    r = simulate(cyclic_trace(), "lru", 2, "global", prefetch="history")
    assert (r.accesses, r.hits, r.misses) == (6, 3, 3)
    assert (r.prefetch_issued, r.prefetch_hits, r.prefetch_wasted) == (4, 3, 0)
    assert r.evictions == 1 + 4  # one demand eviction at step 0, one per prefetch
    assert r.bytes_moved == (3 + 4) * 1_000_000 and r.demand_bytes == 3_000_000
    assert r.prefetch_bytes == 4_000_000
    assert (r.prefetch, r.history_window, r.label) == ("history", 8, "lru+history")
    assert r.prefetch_late is None  # only the timing model knows when a copy landed


def test_wasted_prefetch() -> None:
    # Per-layer caches of 1 slot. Layer 0 always uses expert 0; layer 1 uses 1, 1, 2, 3.
    ids = np.array([[[0], [1]], [[0], [1]], [[0], [2]], [[0], [3]]])
    trace = RoutingTrace(ids, np.arange(5), 4)
    # At step 3, layer 0 predicts expert 1 for layer 1 (used twice in its window), which is not resident
    # (expert 2 is): the prefetch evicts 2 and loads 1; layer 1 then needs 3, evicting the unused 1.
    r = simulate(trace, "lru", 1, "layer", prefetch="history")
    assert (r.hits, r.misses) == (4, 4)
    assert (r.prefetch_issued, r.prefetch_hits, r.prefetch_wasted) == (1, 0, 1)
    none = simulate(trace, "lru", 1, "layer")
    assert (none.hits, none.misses) == (4, 4) and none.bytes_moved is None  # no expert size in this trace


def test_a_multi_wave_access_prefetches_the_next_layer_only() -> None:
    # One global cache of 3 slots, top-1. One step, a 4-token prefill using experts 0-3 in both layers: two
    # waves each. Behind layer 0's last wave (expert 3) the next layer's experts go into the two slots it
    # leaves, ascending (history has seen nothing of layer 1: every expert): 0 and 1, which layer 1 then
    # hits. Layer 1's own multi-wave access prefetches nothing: the next step starts over at layer 0.
    prefill = np.array([[[0], [0]], [[1], [1]], [[2], [2]], [[3], [3]]])  # [tokens, layers, k]
    r = simulate(RoutingTrace.from_steps([prefill], num_experts=4), "lru", 3, "global", prefetch="history")
    assert (r.prefetch_issued, r.prefetch_hits, r.prefetch_wasted) == (2, 2, 0)
    assert (r.accesses, r.hits, r.misses) == (8, 2, 6)  # without the prefetch: 8 accesses, 8 misses


def test_prefetch_never_evicts_the_running_layers_experts() -> None:
    # One global slot: the only resident key is always the running layer's expert, so nothing can be
    # prefetched, and the demand counts are those of plain LRU.
    ids = np.array([[[0], [1]]] * 3)
    trace = RoutingTrace(ids, np.arange(4), 2)
    r = simulate(trace, "lru", 1, "global", prefetch="history")
    assert (r.hits, r.misses, r.prefetch_issued, r.prefetch_wasted) == (0, 6, 0, 0)


def test_the_history_window_is_passed_on() -> None:
    # With a window of one access, layer 1's prediction at step 3 is its last expert (2), already resident:
    # nothing is prefetched, nothing wasted (compare test_wasted_prefetch, window 8).
    ids = np.array([[[0], [1]], [[0], [1]], [[0], [2]], [[0], [3]]])
    r = simulate(RoutingTrace(ids, np.arange(5), 4), "lru", 1, "layer", prefetch="history", history_window=1)
    assert (r.prefetch_issued, r.prefetch_wasted, r.history_window) == (0, 0, 1)
    with pytest.raises(ValueError, match="history window"):
        simulate(cyclic_trace(), "lru", 2, prefetch="history", history_window=0)


# -- the protocol as written, against simulate() -------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lfru", "static", "belady"])
@pytest.mark.parametrize("scope,capacity", [("layer", 4), ("global", 7)])
def test_simulate_follows_the_protocol(policy: str, scope: str, capacity: int) -> None:
    seq = AccessSequence.from_trace(random_trace(3))
    factory = policy_factory_for(policy, seq, scope)  # type: ignore[arg-type]
    cache = ExpertCache(seq.num_layers, seq.num_experts, capacity, factory, scope=scope)  # type: ignore[arg-type]
    predictor = HistoryPredictor(seq.num_layers, window=8)
    multi_wave = 0
    for layer, experts in zip(seq.layers, seq.experts, strict=True):
        plan = cache.access(layer, experts)
        predictor.observe(layer, experts)
        if len(plan.waves) > 1:  # the next layer's predicted experts, else all of them, behind the last wave
            multi_wave += 1
            if layer + 1 < seq.num_layers:
                guessed = predictor.predict(layer + 1, seq.num_experts) or list(range(seq.num_experts))
                last = plan.waves[-1].experts
                issued = cache.prefetch(layer + 1, guessed, running_layer=layer, running=last)
                assert not {(layer, e) for e in last} & set(issued.evicted)  # the last wave keeps its experts
            continue
        target = next_layer(layer, seq.num_layers, wrap=True)
        assert target is not None
        issued = cache.prefetch(
            target, predictor.predict(target, seq.top_k), running_layer=layer, running=experts
        )
        assert not {(layer, e) for e in experts} & set(issued.evicted)  # the running layer keeps its experts
        assert all(cache.slot_of(target, e) is not None for e in issued.experts)
    assert multi_wave > 0 and cache.prefetch_issued > 0
    r = simulate(seq, policy, capacity, scope, prefetch="history")  # type: ignore[arg-type]
    assert (r.hits, r.misses, r.evictions) == (cache.hits, cache.misses, cache.evictions)
    assert (r.prefetch_issued, r.prefetch_hits, r.prefetch_wasted) == (
        cache.prefetch_issued,
        cache.prefetch_hits,
        cache.prefetch_wasted,
    )


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "random", "lfru", "static", "belady"])
@pytest.mark.parametrize("scope,capacity", [("layer", 3), ("layer", 6), ("global", 5), ("global", 14)])
def test_counters_add_up(policy: str, scope: str, capacity: int) -> None:
    seq = AccessSequence.from_trace(random_trace(11))
    timing = TimingModel(bandwidth_gbps=2.0, compute_s_per_layer=1e-3)
    none = simulate(seq, policy, capacity, scope, timing=timing, expert_bytes=1_000_000)  # type: ignore[arg-type]
    hist = simulate(seq, policy, capacity, scope, timing=timing, expert_bytes=1_000_000, prefetch="history")  # type: ignore[arg-type]
    for r in (none, hist):
        assert r.hits + r.misses == r.accesses == seq.expert_accesses
        assert r.bytes_moved == (r.misses + r.prefetch_issued) * 1_000_000
        assert r.seconds == pytest.approx(seq.num_accesses * 1e-3 + r.stall_seconds)
    assert hist.prefetch_hits + hist.prefetch_wasted <= hist.prefetch_issued
    assert hist.prefetch_late is not None and hist.prefetch_late <= hist.prefetch_hits
    assert (none.prefetch, none.prefetch_issued, none.prefetch_late, none.history_window) == (
        "none",
        0,
        None,
        None,
    )
    assert simulate(seq, policy, capacity, scope, prefetch="none") == simulate(seq, policy, capacity, scope)  # type: ignore[arg-type]


def test_lru_with_prefetch_takes_the_generic_path() -> None:
    seq = AccessSequence.from_trace(random_trace(2))
    fast = simulate(seq, "lru", 4, prefetch="history")
    assert fast == simulate(seq, "lru", 4, prefetch="history", fast=False)
    assert fast.prefetch_issued > 0


def test_lookahead_and_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"lookahead.*hidden states.*only in the runtime"):
        simulate(cyclic_trace(), "lru", 2, prefetch="lookahead")
    with pytest.raises(ValueError, match="unknown prefetch mode 'oracle'"):
        simulate(cyclic_trace(), "lru", 2, prefetch="oracle")


# -- the timing model with overlap ---------------------------------------------------------------------------
def test_timing_prefetch_that_fits_in_the_compute() -> None:
    # 1 ms per copy (1 MB at 1 GB/s), 2 ms compute per layer access. Step 0: three demand misses, 1 ms stall
    # each; layer 2's prefetch of (0, 0) queues behind its demand copy (7-8 ms) and lands while layer 2
    # computes (7-9 ms). Step 1: every prefetch lands 1 ms into the compute of the layer before: no stall.
    # 6 x 2 ms + 3 ms = 15 ms for 2 tokens. Without prefetch: 6 x 2 ms + 6 ms = 18 ms.
    timing = TimingModel(bandwidth_gbps=1.0, compute_s_per_layer=2e-3)
    r = simulate(cyclic_trace(), "lru", 2, "global", timing=timing, prefetch="history")
    assert r.seconds == pytest.approx(15e-3) and r.stall_seconds == pytest.approx(3e-3)
    assert r.tokens_per_s == pytest.approx(2 / 15e-3) and r.stall_fraction == pytest.approx(0.2)
    assert r.prefetch_late == 0
    none = simulate(cyclic_trace(), "lru", 2, "global", timing=timing)
    assert none.seconds == pytest.approx(18e-3) and none.stall_seconds == pytest.approx(6e-3)


def test_timing_prefetch_longer_than_the_compute() -> None:
    # 1 ms per copy, 0.5 ms compute. Step 0: accesses at 0, 1.5, 3 ms, 1 ms stall each; layer 2's prefetch
    # runs 4-5 ms. Step 1: layer 0 starts at 4.5 ms, waits for it (0.5 ms, late); its own prefetch queues
    # behind, 5-6 ms; layer 1 starts at 5.5 ms, waits 0.5 ms; the same for layer 2 (prefetch 6-7 ms).
    # 6 x 0.5 ms + 3 x 1 ms + 3 x 0.5 ms = 7.5 ms. Without prefetch: 6 x 0.5 ms + 6 x 1 ms = 9 ms.
    timing = TimingModel(bandwidth_gbps=1.0, compute_s_per_layer=0.5e-3)
    r = simulate(cyclic_trace(), "lru", 2, "global", timing=timing, prefetch="history")
    assert r.seconds == pytest.approx(7.5e-3) and r.stall_seconds == pytest.approx(4.5e-3)
    assert r.prefetch_late == 3
    assert simulate(cyclic_trace(), "lru", 2, "global", timing=timing).seconds == pytest.approx(9e-3)


def test_timeline_demand_copies_queue_behind_prefetches_and_unread_ones_do_not_stall() -> None:
    """The timing model alone; whether a read prefetch was late is what ``landed`` says just before the access
    that reads it (the prefetch protocol counts it from there)."""
    t = CopyTimeline(TimingModel(bandwidth_gbps=1.0, compute_s_per_layer=1e-3), expert_bytes=1_000_000)
    t.access(0, [])  # 0-1 ms compute, no copies
    t.prefetch([10, 11, 12])  # issued at 0: land at 1, 2, 3 ms
    assert t.landed(10)  # lands at 1 ms, when the next access starts: in time
    t.access(0, [10])  # starts at 1 ms; key 10 landed at 1 ms: no stall; computes 1-2 ms
    assert (t.clock, t.stall_seconds) == (pytest.approx(2e-3), 0.0)
    t.access(0, [])  # 2-3 ms: keys 11 and 12 are still in flight but not read: no stall
    assert t.stall_seconds == 0.0
    t.access(1, [])  # starts at 3 ms; its demand copy queues behind key 12 (lands 3 ms): 3-4 ms, stall 1 ms
    assert t.clock == pytest.approx(5e-3) and t.stall_seconds == pytest.approx(1e-3)
    t.prefetch([13])  # issued at 3 ms behind the demand copy: 4-5 ms
    assert t.landed(13)  # landed at 5 ms, when the next access starts
    t.access(0, [13])  # starts at 5 ms; landed at 5 ms
    assert t.clock == pytest.approx(6e-3)
    t.prefetch([14, 15])  # 5-6, 6-7 ms
    assert not t.landed(15)  # the next access starts at 6 ms: late
    t.access(0, [15])  # starts at 6 ms, waits for 15 until 7 ms
    assert t.stall_seconds == pytest.approx(2e-3) and t.clock == pytest.approx(8e-3)
