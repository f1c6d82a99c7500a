"""The layer step's stages in their order: demand copies are issued before the prefetch guess, the prefetch's
copies queue behind them, and compute waits for exactly each wave's slots; results equal a one-shot compute."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cache_policies import ExpertCache, Guess, Prefetcher, make_policy_factory
from offload.kernels import ExpertActivation, RoutedTokens, expert_pairs_torch
from offload.kernels.activation import GateTimesUp
from offload.memory.copy_engines import SyncCopyEngine
from offload.memory.host_store import HostExpertStore
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool
from offload.runtime.expert_source import InRam
from offload.runtime.layer_step import LayerStep

LAYERS, EXPERTS, H, I = 2, 6, 8, 4  # noqa: E741
LAYOUT = ExpertLayout(H, I, True, False, torch.float32)
ACTIVATION = ExpertActivation("silu", True, GateTimesUp(torch.nn.functional.silu))


class LoggingEngine(SyncCopyEngine):
    def __init__(self, pool: SlotPool, log: list[tuple[str, Any]]) -> None:
        super().__init__(pool)
        self.log = log

    def load(self, loads: Sequence[tuple[int, torch.Tensor]], keys: Sequence[int] | None = None) -> None:
        self.log.append(("load", [slot for slot, _ in loads]))
        super().load(loads, keys)

    def acquire(self, slots: Sequence[int]) -> None:
        self.log.append(("acquire", list(slots)))

    def release(self, slots: Sequence[int]) -> None:
        self.log.append(("release", list(slots)))


class NextLayerGuess:
    name = "scripted"

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def guess(self, layer: int, count: int, hint: Any) -> Guess | None:
        self.log.append(("guess", layer))
        return Guess(layer + 1, [4, 5]) if layer + 1 < LAYERS else None


def build(slots: int) -> tuple[LayerStep, list[tuple[str, Any]], HostExpertStore]:
    log: list[tuple[str, Any]] = []
    store = HostExpertStore(LAYOUT, LAYERS, EXPERTS, pin=False)
    g = torch.Generator().manual_seed(0)
    for layer in range(LAYERS):
        store.fill_layer(
            layer,
            {
                "gate_up_proj": torch.randn(EXPERTS, 2 * I, H, generator=g),
                "down_proj": torch.randn(EXPERTS, H, I, generator=g),
            },
        )
    pool = SlotPool(LAYOUT, slots, torch.device("cpu"), table_shape=(LAYERS, EXPERTS))
    cache = ExpertCache(LAYERS, EXPERTS, slots, make_policy_factory("lru"))
    step = LayerStep(cache, InRam(store), pool, LoggingEngine(pool, log), expert_pairs_torch, EXPERTS)
    step.prefetcher = Prefetcher(cache, NextLayerGuess(log), top_k=2)
    return step, log, store


def reference(store: HostExpertStore, layer: int, hidden, index, weights) -> torch.Tensor:
    """Every expert of the layer resident in its own slot, computed at once."""
    pool = SlotPool(LAYOUT, EXPERTS, torch.device("cpu"))
    for e in range(EXPERTS):
        pool.slot(e).copy_(store.expert(layer, e))
    routed = RoutedTokens.build(hidden, index, weights, EXPERTS)
    out = torch.zeros(index.numel(), H)
    expert_pairs_torch(routed, routed.experts, routed.experts, pool, ACTIVATION, out)
    return out.view(*index.shape, H).sum(1)


def test_single_wave_order() -> None:
    step, log, store = build(slots=4)
    hidden = torch.randn(1, H)
    index, weights = torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]])
    out = step(0, ACTIVATION, hidden, index, weights)
    assert log == [
        ("load", [0, 1]),  # demand: experts 0 and 2, ascending, into the free slots
        ("guess", 0),  # only then is the next layer predicted
        ("load", [2, 3]),  # its copies queue behind the demand copies
        ("acquire", [0, 1]),
        ("release", [0, 1]),
    ]
    assert torch.equal(out, reference(store, 0, hidden, index, weights))
    assert step.pool.table[0, [0, 2]].tolist() == [0, 1] and step.pool.table[1, [4, 5]].tolist() == [2, 3]


def test_a_wave_at_a_time_then_the_next_layer_behind_the_last_wave() -> None:
    """One wave at a time (stream_groups 1): copy a wave, compute it, copy the next into the freed slots; the
    next layer's guess is copied in behind the last wave's copy, into the slot that wave leaves free."""
    step, log, store = build(slots=2)
    step.stream_groups = 1
    hidden = torch.randn(3, H)
    index, weights = torch.tensor([[0, 1], [2, 0], [1, 2]]), torch.full((3, 2), 0.5)
    out = step(0, ACTIVATION, hidden, index, weights)  # three experts, two slots: waves [0, 1] and [2]
    last = step.cache.slot_of(0, 2)
    free = 1 - last
    assert log == [
        ("load", [0, 1]),
        ("acquire", [0, 1]),
        ("release", [0, 1]),
        ("load", [last]),  # the last wave's copy
        ("guess", 0),
        ("load", [free]),  # layer 1's guessed expert 4 (of 4 and 5: one slot is free)
        ("acquire", [last]),
        ("release", [last]),
    ]
    assert step.cache.slot_of(1, 4) == free and step.waves == 2 and step.layer_calls == 1
    assert torch.equal(out, reference(store, 0, hidden, index, weights))  # waves never change results


def test_streamed_waves_compute_each_expert_as_it_lands_and_refill_its_slot_at_once() -> None:
    """A prefill-sized call streams (LayerStep._stream_waves): the first wave's experts are computed one group
    at a time, and the second wave's copy into a slot is issued right after the group that read it releases
    it, before the rest of the first wave computes; the next layer's guess follows the last wave's copy. The
    same results as a wave at a time, bitwise."""
    step, log, store = build(slots=2)
    hidden = torch.randn(3, H)
    index, weights = torch.tensor([[0, 1], [2, 0], [1, 2]]), torch.full((3, 2), 0.5)
    out = step(0, ACTIVATION, hidden, index, weights)
    last = step.cache.slot_of(0, 2)
    free = 1 - last
    assert log == [
        ("load", [0, 1]),  # the first wave's two copies
        ("acquire", [0]),
        ("release", [0]),
        ("load", [last]),  # the second wave's copy into the slot just released
        ("acquire", [1]),
        ("release", [1]),
        ("guess", 0),
        ("load", [free]),  # layer 1's guess, while the last wave computes
        ("acquire", [last]),
        ("release", [last]),
    ]
    assert last == 0 and step.waves == 2 and step.layer_calls == 1
    assert torch.equal(out, reference(store, 0, hidden, index, weights))


def test_one_token_grouping_equals_the_general_path() -> None:
    """The decode shortcut (one token, distinct experts) groups pairs exactly as the general path does, and
    the cases it does not take (a repeated expert, a padding id, a negative id) still go the general way."""
    import pytest

    hidden, weights = torch.zeros(1, 4), torch.full((1, 4), 0.25)
    one = RoutedTokens.build(hidden, torch.tensor([[7, 2, 9, 4]]), weights, 16)
    assert one.spans == {2: (0, 1), 4: (1, 2), 7: (2, 3), 9: (3, 4)} and one.experts == [2, 4, 7, 9]
    assert one.pairs_by_expert.tolist() == [1, 3, 0, 2] and one.complete
    repeated = RoutedTokens.build(hidden, torch.tensor([[3, 1, 3, 0]]), weights, 16)  # an override may
    assert repeated.spans == {0: (0, 1), 1: (1, 2), 3: (2, 4)} and repeated.pairs_by_expert.tolist() == [
        3,
        1,
        0,
        2,
    ]
    padded = RoutedTokens.build(hidden, torch.tensor([[5, 16, 1, 17]]), weights, 16)  # ids >= E: padding
    assert padded.spans == {1: (0, 1), 5: (1, 2)} and not padded.complete
    with pytest.raises(ValueError, match="non-negative"):
        RoutedTokens.build(hidden, torch.tensor([[5, -1, 1, 2]]), weights, 16)


def test_python_and_numpy_grouping_agree(monkeypatch) -> None:
    """Up to 64 pairs the ids are grouped in plain Python, above in numpy: the same spans, order and ids."""
    import offload.kernels.routing as routing

    g = torch.Generator().manual_seed(1)
    for tokens in (1, 3, 8, 9):
        index = torch.randint(0, 20, (tokens, 8), generator=g)  # repeats across tokens, padding ids 16-19
        hidden, weights = torch.zeros(tokens, 4), torch.rand(tokens, 8, generator=g)
        built = {}
        for small in (0, 64):
            monkeypatch.setattr(routing, "_SMALL", small)
            built[small] = RoutedTokens.build(hidden, index, weights, 16)
        python, numpy_ = built[64], built[0]
        assert python.spans == numpy_.spans and python.experts == numpy_.experts
        assert python.complete == numpy_.complete
        assert torch.equal(python.pairs_by_expert, numpy_.pairs_by_expert)
        assert list(python.ids) == numpy_.ids.tolist() == index.flatten().tolist()


def test_reused_pair_buffer_leaks_nothing_between_calls() -> None:
    """A decode step's per-pair buffer is reused by the next call: an earlier output is not changed by later
    calls, and a call with a padding id (rows no expert writes) still sums zeros for them."""
    step, _, store = build(slots=EXPERTS)
    step.prefetcher = None
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, H, generator=g)
    weights = torch.tensor([[0.6, 0.4]])
    first = step(0, ACTIVATION, hidden, torch.tensor([[1, 3]]), weights)
    kept = first.clone()
    padded = torch.tensor([[4, EXPERTS]])  # id E: padding, its row is written by no wave
    out = step(0, ACTIVATION, hidden, padded, weights)
    assert torch.equal(first, kept)
    assert torch.equal(out, reference(store, 0, hidden, padded, weights))
    again = step(0, ACTIVATION, hidden, torch.tensor([[1, 3]]), weights)
    assert torch.equal(again, kept) and torch.equal(first, kept)
