"""Cache policies: the shared reference hit rates, and each policy on tiny hand-checked sequences."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from cache_policies import (
    ONLINE_POLICIES,
    POLICIES,
    AccessSequence,
    ExpertCache,
    RoutingTrace,
    load_trace,
    make_policy_factory,
    simulate,
)
from cache_policies.policies.static import pinned_keys
from tests.helpers import TRACES

REFERENCE = TRACES / "reference_hit_rates.txt"
TRACE_FILES = {"olmoe": "olmoe-1b-7b_decode_299.jsonl", "flame": "flame-moe-290m_routing.npz"}


# -- the reference figures ----------------------------------------------------------------------------------
def _reference() -> list[tuple[str, str, float, int, dict[str, str]]]:
    """(trace, scope, fraction, capacity, {policy: "0.123"}) for every line of reference_hit_rates.txt."""
    rows = []
    trace = None
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("# olmoe"):
            trace = "olmoe"
        elif line.startswith("# flame"):
            trace = "flame"
        elif line.strip() and not line.startswith("#"):
            scope, frac, cap, *rates = line.split()
            assert trace is not None
            rows.append(
                (
                    trace,
                    scope,
                    float(frac.split("=")[1]),
                    int(cap.split("=")[1]),
                    dict(r.split("=") for r in rates),
                )
            )
    return rows


REF_ROWS = _reference() if REFERENCE.exists() else []


@pytest.fixture(scope="module")
def sequences() -> dict[str, AccessSequence]:
    return {name: AccessSequence.from_trace(load_trace(TRACES / f)) for name, f in TRACE_FILES.items()}


def test_reference_file_has_all_24_numbers_per_trace() -> None:
    for trace in TRACE_FILES:
        rates = [r for row in REF_ROWS if row[0] == trace for r in row[4].items()]
        assert {p for p, _ in rates} == {"lru", "lfu", "fifo", "belady"}
        assert len(rates) == 24


@pytest.mark.parametrize(
    "trace,scope,fraction,capacity,rates", REF_ROWS, ids=[f"{r[0]}-{r[1]}-{r[2]}" for r in REF_ROWS]
)
def test_reference_hit_rates(
    sequences: dict[str, AccessSequence],
    trace: str,
    scope: str,
    fraction: float,
    capacity: int,
    rates: dict[str, str],
) -> None:
    seq = sequences[trace]
    slots = round(fraction * seq.num_experts)
    assert capacity == (slots if scope == "layer" else slots * seq.num_layers)
    for policy, expected in rates.items():
        # fast=False: the generic ExpertCache path, the one the runtime drives
        got = simulate(seq, policy, capacity, scope, fast=False)  # type: ignore[arg-type]
        assert f"{got.hit_rate:.3f}" == expected, f"{policy}: {got.hit_rate:.5f} != {expected}"
        assert got.accesses == seq.num_accesses * {"olmoe": 8, "flame": 6}[trace]


# -- helpers ------------------------------------------------------------------------------------------------
def one_layer_cache(policy: str, capacity: int, experts: int = 16, **options: object) -> ExpertCache:
    return ExpertCache(1, experts, capacity, make_policy_factory(policy, **options), scope="layer")


def drive(cache: ExpertCache, accesses: list[list[int]], layer: int = 0) -> list[tuple[int, list[int]]]:
    """(hits, evicted experts) of each access."""
    out = []
    for experts in accesses:
        plan = cache.access(layer, sorted(experts))
        out.append((plan.hits, [e for w in plan.waves for (_, e) in w.evicted]))
    return out


def resident_experts(cache: ExpertCache) -> set[int]:
    return {expert for (_, expert) in cache.resident()}


# -- LRU ----------------------------------------------------------------------------------------------------
def test_lru_hit_refreshes_recency() -> None:
    cache = one_layer_cache("lru", 2)
    result = drive(cache, [[0], [1], [0], [2]])
    assert result == [(0, []), (0, []), (1, []), (0, [1])]  # 0 was refreshed, so 1 is the stalest


def test_lru_hits_are_recorded_before_loads() -> None:
    # After [3], [5], [7] the order is 3 5 7. The access [1, 3] hits 3 and loads 1: hits first makes
    # the order 7 3 1 (5 evicted), so [9] evicts 7 and [11] evicts 3 (ascending interleaving would
    # have given 7 1 3 and evicted 1 instead).
    cache = one_layer_cache("lru", 3)
    result = drive(cache, [[3], [5], [7], [1, 3], [9], [11]])
    assert [ev for _, ev in result] == [[], [], [], [5], [7], [3]]
    assert resident_experts(cache) == {1, 9, 11}


def test_lru_never_evicts_the_current_layers_experts() -> None:
    cache = one_layer_cache("lru", 3)
    drive(cache, [[0], [1], [2]])
    plan = cache.access(0, [0, 5])  # 0 is the stalest, but this access needs it
    assert plan.hits == 1 and plan.waves[0].evicted == [(0, 1)]


# -- FIFO ---------------------------------------------------------------------------------------------------
def test_fifo_ignores_hits() -> None:
    cache = one_layer_cache("fifo", 2)
    assert drive(cache, [[0], [1], [0], [2]])[-1] == (0, [0])  # 0 was inserted first; the hit changed nothing


def test_fifo_skips_protected_keys() -> None:
    cache = one_layer_cache("fifo", 2)
    assert drive(cache, [[0], [1], [0, 2]])[-1] == (1, [1])


# -- LFU ----------------------------------------------------------------------------------------------------
def test_lfu_counts_every_use_and_breaks_ties_by_oldest_insertion() -> None:
    # counts after each access: 0:1 | 0:2 | 1:1 | 2:1 (evict 1, count 1 < 2) | 1:2 (evict 2, count 1)
    # | 3: residents 0 (count 2, inserted 1st) and 1 (count 2, inserted 4th): evict 0
    cache = one_layer_cache("lfu", 2)
    result = drive(cache, [[0], [0], [1], [2], [1], [3]])
    assert [ev for _, ev in result] == [[], [], [], [1], [2], [0]]
    assert [h for h, _ in result] == [0, 1, 0, 0, 0, 0]


def test_lfu_remembers_counts_of_evicted_keys() -> None:
    # 5 is used three times, evicted by a run of others... and still outranks a key used once.
    cache = one_layer_cache("lfu", 2)
    drive(cache, [[5], [5], [5], [1], [2]])  # [2] evicts 1 (count 1 < 3)
    assert resident_experts(cache) == {5, 2}
    drive(cache, [[3], [4]])  # [3] evicts 2 (count 1); [4] evicts 3 (count 1)
    assert resident_experts(cache) == {5, 4}


# -- random -------------------------------------------------------------------------------------------------
def _random_accesses(n: int, experts: int, k: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(experts), k)) for _ in range(n)]


def test_random_is_reproducible_by_seed_and_depends_on_it() -> None:
    accesses = _random_accesses(300, 16, 3, seed=1)
    runs = {seed: drive(one_layer_cache("random", 6, seed=seed), accesses) for seed in (0, 1)}
    assert drive(one_layer_cache("random", 6, seed=0), accesses) == runs[0]
    assert runs[0] != runs[1]


def test_random_only_evicts_the_unprotected_key() -> None:
    for seed in range(20):
        cache = one_layer_cache("random", 2, seed=seed)
        assert drive(cache, [[0], [1], [0, 2]])[-1] == (1, [1])


def test_random_victims_are_roughly_uniform() -> None:
    counts = {0: 0, 1: 0, 2: 0}
    for seed in range(600):
        cache = one_layer_cache("random", 3, seed=seed)
        counts[drive(cache, [[0], [1], [2], [3]])[-1][1][0]] += 1
    assert all(150 < c < 250 for c in counts.values()), counts


# -- LFRU ---------------------------------------------------------------------------------------------------
def test_lfru_half_life_moves_it_between_lfu_and_lru() -> None:
    # [0] at t=0, [0] at t=1, [1] at t=2, then [2] at t=3 needs a victim among 0 and 1.
    # half-life 0.5: CRF(0) = 2^-6 + 2^-4 = 0.078 < CRF(1) = 2^-2 = 0.25  -> evict 0 (recency wins)
    # half-life 100: CRF(0) = 2^-0.03 + 2^-0.02 = 1.965 > CRF(1) = 2^-0.01 = 0.993 -> evict 1 (frequency wins)
    accesses = [[0], [0], [1], [2]]
    assert drive(one_layer_cache("lfru", 2, half_life=0.5), accesses)[-1][1] == [0]
    assert drive(one_layer_cache("lfru", 2, half_life=100.0), accesses)[-1][1] == [1]


def _brute_force_lrfu_hits(accesses: list[list[int]], capacity: int, half_life: float) -> int:
    """LRFU straight from its definition: CRF = sum over uses of 2^(-(now - t) / h); O(n^2)."""
    uses: dict[int, list[int]] = {}
    resident: dict[int, int] = {}  # key -> insertion number
    inserts = hits = 0
    for now, experts in enumerate(accesses):
        for e in experts:
            if e in resident:
                hits += 1
        for e in experts:  # the cache loads misses after recording hits; uses are all at `now`
            if e not in resident:
                if len(resident) >= capacity:
                    crf = {k: sum(2.0 ** (-(now - t) / half_life) for t in uses[k]) for k in resident}
                    victim = min(
                        (k for k in resident if k not in experts), key=lambda k: (crf[k], resident[k])
                    )
                    del resident[victim]
                inserts += 1
                resident[e] = inserts
            uses.setdefault(e, []).append(now)
    return hits


@pytest.mark.parametrize("half_life", [0.7, 3.3, 17.0])
def test_lfru_matches_its_definition(half_life: float) -> None:
    accesses = _random_accesses(250, 12, 3, seed=7)
    cache = one_layer_cache("lfru", 5, experts=12, half_life=half_life)
    got = sum(h for h, _ in drive(cache, accesses))
    assert got == _brute_force_lrfu_hits(accesses, 5, half_life)


def test_lfru_rejects_a_bad_half_life() -> None:
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="half_life"):
            make_policy_factory("lfru", half_life=bad)(4)


# -- static -------------------------------------------------------------------------------------------------
def test_static_pins_the_profiles_top_experts_and_pages_the_rest_by_lru() -> None:
    profile = np.array([[5, 0, 9, 1, 0, 0]])  # pins 2 then 0 with capacity 3, one dynamic slot
    cache = one_layer_cache("static", 3, experts=6, profile=profile, dynamic_slots=1, scope="layer")
    result = drive(cache, [[2], [0], [3], [4], [5], [2], [0]])
    assert [ev for _, ev in result] == [[], [], [], [3], [4], [], []]
    assert [h for h, _ in result] == [0, 0, 0, 0, 0, 1, 1]
    # an access with two unpinned experts and one dynamic slot: the least used pinned expert (0) goes
    plan = cache.access(0, [1, 3])
    assert [e for w in plan.waves for (_, e) in w.evicted] == [5, 0]
    # and 0 is pinned again when it comes back: the dynamic LRU area (1 then 3) gives way
    plan = cache.access(0, [0])
    assert [e for w in plan.waves for (_, e) in w.evicted] == [1]


def test_static_pins_per_layer_or_globally() -> None:
    profile = np.array([[4, 9, 1], [8, 7, 6]])  # keys: layer 0 -> 0..2, layer 1 -> 3..5
    assert pinned_keys(profile, 3, 1, "layer") == {1: 0, 0: 1, 3: 0, 4: 1}
    assert pinned_keys(profile, 3, 1, "global") == {1: 0, 3: 1}
    assert pinned_keys(profile, 4, 1, "global") == {1: 0, 3: 1, 4: 2}
    assert pinned_keys(np.array([[3, 0, 0]]), 3, 1, "layer") == {0: 0}  # never seen: never pinned


def test_static_needs_its_profile() -> None:
    with pytest.raises(ValueError, match="profile"):
        make_policy_factory("static")


# -- Belady -------------------------------------------------------------------------------------------------
def _trace(accesses: list[list[int]], experts: int) -> RoutingTrace:
    """One layer, one token per step, each access's experts as that token's top-k."""
    k = len(accesses[0])
    ids = np.array(accesses, dtype=np.int64).reshape(len(accesses), 1, k)
    return RoutingTrace(ids, np.arange(len(accesses) + 1), experts)


def test_belady_evicts_the_farthest_next_use() -> None:
    # at [2] (t=2): next uses 0 -> t=3, 1 -> t=4: evict 1. [0] hits. At [1] (t=4): 0 and 2 are never used
    # again; the tie goes to the larger key (2). At [3]: 0 and 1 never used again: evict 1.
    seq = AccessSequence.from_trace(_trace([[0], [1], [2], [0], [1], [3]], 4))
    cache = ExpertCache(1, 4, 2, make_policy_factory("belady", future=seq.future), scope="layer")
    result = drive(cache, [list(e) for e in seq.experts])
    assert [ev for _, ev in result] == [[], [], [1], [], [2], [1]]
    assert simulate(seq, "belady", 2).hits == 1


def test_belady_needs_the_future_and_is_offline() -> None:
    assert "belady" in POLICIES and "belady" not in ONLINE_POLICIES
    with pytest.raises(ValueError, match="future"):
        make_policy_factory("belady")


def test_belady_is_never_beaten() -> None:
    rng = random.Random(3)
    for trial in range(6):
        # skewed popularity, like real routers; two layers; one token per step
        steps = [[sorted(rng.sample(range(10), 3)) for _ in range(2)] for _ in range(150)]
        ids = np.array(steps).reshape(150, 2, 3)
        seq = AccessSequence.from_trace(RoutingTrace(ids, np.arange(151), 10))
        for scope, capacity in (("layer", 4), ("global", 7)):
            bound = simulate(seq, "belady", capacity, scope).hits  # type: ignore[arg-type]
            for policy in ONLINE_POLICIES:
                assert simulate(seq, policy, capacity, scope).hits <= bound, (trial, policy, scope)  # type: ignore[arg-type]


# -- registry -----------------------------------------------------------------------------------------------
def test_registry_names_and_options() -> None:
    assert set(POLICIES) == {"lru", "lfu", "fifo", "random", "lfru", "static", "belady"}
    assert make_policy_factory("lru")(4).name == "lru"
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        make_policy_factory("mru")
    with pytest.raises(ValueError, match="does not take seed"):
        make_policy_factory("lru", seed=1)


def test_lfru_prefetched_key_ranks_as_just_used() -> None:
    """A prefetched key is not the next victim: it ranks as if used now, in a per-layer cache too."""
    from cache_policies import ExpertCache, make_policy_factory

    cache = ExpertCache(2, 8, 2, make_policy_factory("lfru", half_life=1.0), scope="layer")
    for e in range(3):
        cache.access(0, [0])
        cache.access(1, [e])
    cache.access(0, [0])
    cache.prefetch(1, [0], running_layer=0, running=[0])  # (1, 0) takes the slot of (1, 1)
    assert cache.access(1, [3]).waves[0].evicted == [(1, 2)]  # the stale key goes, not the prefetched one
    assert cache.prefetch_wasted == 0
