"""The copy-or-compute rule with given rates, the cache's bypass, and the same rule in the simulator."""

from __future__ import annotations

import numpy as np
import pytest

from cache_policies import LFU, CopyOrCompute, ExpertCache, HostRates, RoutingTrace, TimingModel, simulate
from cache_policies.study.access import AccessSequence

MB = 1_000_000


def rule(mode: str, link: float = 25.0, host: float = 50.0, device_s: float = 0.0) -> CopyOrCompute:
    return CopyOrCompute(mode, 10 * MB, HostRates.flat(link, host, device_s))


def test_off_and_always() -> None:
    assert rule("off").choose([1, 5], [1, 1], hits=0) == []
    assert rule("always").choose([1, 5], [1, 1], hits=0) == [1, 5]


def test_auto_balances_link_and_host() -> None:
    # copy 0.4 ms, host 0.2 ms per expert: of 6 misses, 4 on the host (0.8 ms) and 2 copied (0.8 ms) is the best
    # split; a 5th on the host would make the host path 1.0 ms.
    assert rule("auto").choose(list(range(6)), [1] * 6, hits=0) == [0, 1, 2, 3]
    # a host 10x slower than the link: everything is copied
    assert rule("auto", host=2.5).choose([3, 4], [1, 1], hits=2) == []
    # a slow device (device_s per expert) pushes work to the host
    assert rule("auto", host=10.0, device_s=0.002).choose([3, 4], [1, 1], hits=2) == [3, 4]


def test_a_busy_device_path_moves_work_to_the_host() -> None:
    """The disk tier's experts on disk are read and copied on the device path meanwhile (busy_s): experts in
    RAM then go to the host sooner. Copy 0.4 ms, host 0.2 ms per expert."""
    assert rule("auto").choose([0, 1], [1, 1], hits=0) == [0]  # one each way: 0.4 ms against 0.2 ms
    assert rule("auto").choose([0, 1], [1, 1], hits=0, busy_s=0.002) == [0, 1]  # 2 ms of reads: both
    assert rule("auto", host=2.5).choose([0], [1], hits=0, busy_s=0.002) == []  # 4 ms on the host: no


def test_auto_weighs_tokens() -> None:
    rates = HostRates(25.0, ((1, 50.0), (16, 25.0)))  # 16 tokens: half the rate per byte
    r = CopyOrCompute("auto", 10 * MB, rates)
    assert r.host_s(1) == pytest.approx(0.2e-3)
    assert r.host_s(16) == pytest.approx(0.4e-3)
    assert r.host_s(32) == pytest.approx(0.8e-3)  # past the last point: in proportion to the tokens
    # one expert with 64 tokens (3.2 ms on the host) is copied; one with 1 token goes to the host
    assert r.choose([2, 7], [64, 1], hits=0) == [7]


@pytest.mark.parametrize(
    "bad",
    [
        lambda: HostRates(0.0, ((1, 1.0),)),
        lambda: HostRates(1.0, ()),
        lambda: HostRates(1.0, ((4, 1.0), (1, 2.0))),
        lambda: HostRates(1.0, ((1, -1.0),)),
        lambda: CopyOrCompute("sometimes", 10, None),
        lambda: CopyOrCompute("auto", 10, None),
    ],
)
def test_bad_rates_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        bad()


def test_bypass_policy_sees_the_use_but_nothing_is_admitted() -> None:
    policies: list[LFU] = []

    def factory(capacity: int) -> LFU:
        policies.append(LFU(capacity))
        return policies[-1]

    cache = ExpertCache(1, 8, 2, factory)
    plan = cache.access(0, [1, 3, 5], host=lambda missing, hits: [3])
    assert plan.host == [3] and plan.misses == 2 and plan.hits == 0
    assert [w.experts for w in plan.waves] == [[1, 5]]
    assert cache.slot_of(0, 3) is None and cache.host_computed == 1 and cache.misses == 2
    assert policies[0]._count[3] == 1  # LFU counted the use of the expert it never held
    # every miss on the host: one empty wave, nothing resident changes
    plan = cache.access(0, [2, 3], host=lambda missing, hits: missing)
    assert plan.host == [2, 3] and [w.experts for w in plan.waves] == [[]]
    assert set(cache.resident()) == {(0, 1), (0, 5)}
    # a hit is never offered to the rule
    offered: list[list[int]] = []
    cache.access(0, [1, 4], host=lambda missing, hits: offered.append(missing) or [])
    assert offered == [[4]]


def decode_trace(seed: int = 0, steps: int = 40) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(16, 4, replace=False) for _ in range(3)] for _ in range(steps)])
    return RoutingTrace(ids=ids, step_offsets=np.arange(steps + 1), num_experts=16, expert_bytes=10 * MB)


def test_simulator_off_equals_plain_and_split_adds_up() -> None:
    trace = decode_trace()
    timing = TimingModel(25.0, 1e-4)
    plain = simulate(trace, "lru", 4, "layer", timing=timing)
    off = simulate(trace, "lru", 4, "layer", timing=timing, host=rule("off"))
    assert (off.hits, off.misses, off.seconds) == (plain.hits, plain.misses, plain.seconds)
    always = simulate(trace, "lru", 4, "layer", timing=timing, host=rule("always"))
    assert always.hits == 0 and always.misses == 0 and always.host_computed == always.accesses
    auto = simulate(trace, "lfu", 4, "layer", timing=timing, host=rule("auto"))
    assert auto.hits + auto.misses + auto.host_computed == auto.accesses
    assert 0 < auto.host_computed < auto.accesses - auto.hits
    assert auto.seconds is not None and plain.seconds is not None and auto.seconds < plain.seconds
    assert auto.label == "lfu+host"


def test_prefill_counts_reach_the_rule() -> None:
    rng = np.random.default_rng(1)
    ids = np.argsort(rng.random((24, 3, 16)), axis=2)[:, :, :4]  # 4 distinct experts per token and layer
    trace = RoutingTrace(ids=ids, step_offsets=np.array([0, 12, 24]), num_experts=16, expert_bytes=10 * MB)
    seq = AccessSequence.from_trace(trace)
    assert seq.counts is not None and sum(seq.tokens_of(0)) == 12 * 4
