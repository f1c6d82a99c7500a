"""offload.close(model): the copy thread or stream, the slots and the (pinned) host store go at once, and the
model says so if used afterwards. And the routing override hook, installed and removed from the API."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest
import torch

import offload
from offload.hf.install import runtime_of
from offload.memory.copy_engines import CudaCopyEngine, ThreadedCopyEngine, injected_copy_delays
from tests.conftest import DEVICES
from tests.helpers import load, prompt, slot_counts


def copy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "offload-copy" and t.is_alive()]


def test_close_releases_thread_slots_and_host_store(mixtral_checkpoint: Path) -> None:
    before = set(copy_threads())  # other tests' models may still be alive, or be collected meanwhile
    model = load(mixtral_checkpoint, slot_counts(mixtral_checkpoint)["quarter"], "cpu", prefetch="history")
    runtime = runtime_of(model)
    mine = set(copy_threads()) - before
    assert isinstance(runtime.engine, ThreadedCopyEngine) and len(mine) == 1
    with torch.no_grad():
        expected = model(prompt("cpu")).logits
    buffers = [
        weakref.ref(runtime.store.expert(layer, 0)._base) for layer in range(runtime.survey.num_layers)
    ]
    pool = weakref.ref(runtime.pool.data)
    offload.close(model)
    gc.collect()
    assert not any(thread.is_alive() for thread in mine), "the copy thread outlived close()"
    assert all(ref() is None for ref in buffers), "a host store buffer is still alive"
    assert pool() is None and runtime.pool.nbytes == 0
    assert not runtime.store.complete and runtime.store.nbytes == 0
    with pytest.raises(offload.OffloadError, match=r"closed by offload\.close"):
        model(prompt("cpu"))
    offload.close(model)  # twice: nothing left to release, no error
    stats = offload.stats(model)  # the counters stay readable
    assert stats.expert_hits + stats.expert_misses > 0 and expected.isfinite().all()


def test_close_needs_an_offloaded_model() -> None:
    with pytest.raises(offload.OffloadError, match="not offloaded"):
        offload.close(torch.nn.Linear(2, 2))


HOLD_SECONDS = 0.05  # CPU: the copy thread sleeps this long before each copy
HOLD_CYCLES = 200_000_000  # CUDA: torch.cuda._sleep on the copy stream before the copies, ~0.1 s


@pytest.mark.parametrize("device", DEVICES)
def test_close_waits_for_the_copies_in_flight(device: str, mixtral_checkpoint: Path) -> None:
    """offload.close() with a slot's worth of copies still in flight (held back: the copy thread sleeps before
    each on CPU, the copy stream spins before them on CUDA) lands them before it lets the slots and the store
    go: afterwards the copy thread has stopped or the copy stream is idle, and every slot holds its expert's
    bytes (read from the pool's memory, which the test keeps; on CUDA on the default stream, which nothing
    orders after the copies but close()'s wait). On CUDA the store is unpinned too."""
    path = mixtral_checkpoint
    slots = slot_counts(path)["quarter"]
    if device == "cpu":
        with injected_copy_delays(HOLD_SECONDS, HOLD_SECONDS):
            model = load(path, slots, "cpu", prefetch="history")
    else:
        model = load(path, slots, "cuda", prefetch="history")
    runtime = runtime_of(model)
    engine, pool, store = runtime.engine, runtime.pool, runtime.store
    experts = [(0, e) for e in range(pool.num_slots)]
    expected = torch.stack([store.expert(layer, e).clone() for layer, e in experts])
    data = pool.data  # the slots' memory, kept past close()
    data.zero_()
    view = store.expert(0, 0)  # keeps the memory map alive past close(): only the pinning goes
    if device == "cuda":
        assert isinstance(engine, CudaCopyEngine) and view.is_pinned()
        torch.cuda.synchronize()  # the zeros are in place
        with torch.cuda.stream(engine.stream):
            torch.cuda._sleep(HOLD_CYCLES)
    else:
        assert isinstance(engine, ThreadedCopyEngine)
    engine.load([(slot, store.expert(layer, e)) for slot, (layer, e) in enumerate(experts)])
    assert not engine.landed(pool.num_slots - 1), "the copies were not in flight"
    offload.close(model)
    if device == "cuda":
        assert isinstance(engine, CudaCopyEngine) and engine.stream.query(), "close() left copies running"
        assert not view.is_pinned()
    else:
        assert isinstance(engine, ThreadedCopyEngine)
        assert not engine._worker.is_alive() and not any(engine._pending), "close() left copies queued"
    assert torch.equal(data.cpu(), expected), "a copy had not landed when close() returned"
    assert runtime.pool.nbytes == 0 and store.nbytes == 0


def test_routing_override_replaces_the_choices_and_can_be_removed(mixtral_checkpoint: Path) -> None:
    """Every token forced onto experts 0 and 1: the cache and the recorder see exactly those; None restores
    the model's own routing (the same logits as a model never overridden)."""
    path = mixtral_checkpoint
    plain = load(path, slot_counts(path)["all"], "cpu")
    model = load(path, slot_counts(path)["all"], "cpu", record_trace=True)
    calls: list[int] = []

    def first_two(
        layer: int, index: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(layer)
        return torch.tensor([0, 1]).expand_as(index).contiguous(), weights

    offload.override_routing(model, first_two)
    with torch.no_grad():
        forced = model(prompt("cpu")).logits
    trace = offload.routing_trace(model)
    assert calls == list(range(runtime_of(model).survey.num_layers))
    assert {tuple(sorted(row)) for row in trace.step_ids(0).reshape(-1, 2).tolist()} == {(0, 1)}
    assert offload.stats(model).expert_misses == 2 * len(calls)  # only experts 0 and 1 were ever needed
    offload.override_routing(model, None)
    with torch.no_grad():
        own, reference = model(prompt("cpu")).logits, plain(prompt("cpu")).logits
    assert torch.equal(own, reference) and not torch.equal(forced, reference)


def test_a_model_dropped_without_close_releases_after_its_copies(mixtral_checkpoint: Path) -> None:
    """No offload.close(): when the model goes, the runtime's finalizer waits for the copy thread's queued
    copies (delayed here, so some are still queued) before the slots and the store are let go."""
    from offload.memory.copy_engines import injected_copy_delays

    before = set(copy_threads())
    with injected_copy_delays(0.001, 0.003, seed=1):
        model = load(
            mixtral_checkpoint, slot_counts(mixtral_checkpoint)["quarter"], "cpu", prefetch="history"
        )
    mine = set(copy_threads()) - before
    assert len(mine) == 1
    runtime = runtime_of(model)
    engine, store = runtime.engine, runtime.store
    with torch.no_grad():
        model(prompt("cpu"))
    del model, runtime
    gc.collect()
    assert not any(thread.is_alive() for thread in mine)
    assert isinstance(engine, ThreadedCopyEngine) and not any(engine._pending)  # every copy landed
    assert store.nbytes == 0  # released after the copies, not before
