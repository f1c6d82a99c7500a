"""Prefetch and copy/compute overlap never change results; the counters add up; the copy engine keeps its rules.

Copies run on a worker thread with random delays injected before each one, so the interleavings of copies
and compute vary from run to run; the outputs must not.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
import torch

import offload
from cache_policies import ONLINE_POLICIES
from offload.hf.install import attach_runtime, runtime_of
from offload.memory.copy_engines import ThreadedCopyEngine, injected_copy_delays
from offload.memory.layout import ExpertLayout
from offload.memory.slot_pool import SlotPool
from offload.runtime.router_predictors import LookaheadPredictor, PreAttentionPredictor
from tests.helpers import load, prompt, slot_counts

DELAY = (0.0, 0.0005)  # seconds before each copy, drawn at random
NEW_TOKENS = 6


def run(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt("cpu")
    with torch.no_grad():
        logits = model(ids).logits
    return logits, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.fixture(scope="module")
def resident(tiny_checkpoints: dict[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The all-resident run of each architecture, demand paging, synchronous copies."""
    out = {}
    for arch in ("mixtral", "qwen3_moe"):
        path = tiny_checkpoints[arch]
        out[arch] = run(load(path, slot_counts(path)["all"], "cpu"))
    return out


# Every policy with the predictors that guess after an access; pre-attention reserves its slots through the
# same cache.prefetch at another moment (before the layer), so a recency and a frequency policy cover it.
GRID = [
    *(
        (arch, policy, prefetch)
        for prefetch in ("none", "history", "lookahead")
        for policy in ONLINE_POLICIES
        for arch in ("mixtral", "qwen3_moe")
    ),
    *((arch, policy, "pre-attention") for policy in ("lru", "lfru") for arch in ("mixtral", "qwen3_moe")),
]


@pytest.mark.parametrize(("arch", "policy", "prefetch"), GRID)
def test_outputs_equal_all_resident_under_random_copy_delays(
    arch: str,
    policy: str,
    prefetch: str,
    tiny_checkpoints: dict[str, Path],
    resident: dict[str, tuple[torch.Tensor, torch.Tensor]],
    tmp_path: Path,
) -> None:
    path = tiny_checkpoints[arch]
    options: dict = {"prefetch": prefetch, "copy_engine": "threaded", "seed": 3}
    if policy == "static":
        profiled = load(path, slot_counts(path)["all"], "cpu", record_trace=True)
        run(profiled)
        options["static_profile"] = str(offload.routing_trace(profiled).save(tmp_path / "profile.npz"))
    expected_logits, expected_tokens = resident[arch]
    for budget in ("top_k", "quarter"):  # where slots are scarce: waves, evictions, wasted prefetches
        with injected_copy_delays(*DELAY, seed=3):
            model = load(path, slot_counts(path)[budget], "cpu", policy=policy, **options)
        assert isinstance(runtime_of(model).engine, ThreadedCopyEngine)
        logits, tokens = run(model)
        assert torch.equal(logits, expected_logits), f"{arch} {policy} {prefetch} {budget}: logits changed"
        assert torch.equal(tokens, expected_tokens), f"{arch} {policy} {prefetch} {budget}: tokens changed"
        stats = offload.stats(model)
        assert stats.prefetch_used + stats.prefetch_late <= stats.prefetch_issued
        assert stats.prefetch_wasted <= stats.prefetch_issued
        if prefetch == "none":
            assert stats.prefetch_issued == 0
        offload.close(model)


@pytest.mark.parametrize("prefetch", ["history", "lookahead", "pre-attention"])
def test_prefetch_counters(prefetch: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["qwen3_moe"]  # 16 experts, top-4, 3 layers: 48 experts, cache of a half
    model = load(path, slot_counts(path)["half"], "cpu", prefetch=prefetch, copy_engine="threaded")
    run(model)
    stats = offload.stats(model)
    assert stats.prefetch_issued > 0
    assert stats.prefetch_used + stats.prefetch_late > 0  # some predictions were right
    copies = stats.expert_misses + stats.prefetch_issued  # demand misses only, plus prefetches
    assert stats.bytes_host_to_device == copies * runtime_of(model).survey.layout.nbytes
    assert stats.expert_hits + stats.expert_misses == stats.expert_uses  # prefetch adds no expert use
    assert stats.prefetch_recall is not None and 0 < stats.prefetch_recall <= 1
    assert stats.prefetch_precision is not None and 0 < stats.prefetch_precision <= 1


def test_lookahead_predicts_the_next_layer_from_its_router(tiny_checkpoints: dict[str, Path]) -> None:
    """The prediction for layer l+1 is layer l+1's own router applied to layer l's MoE input."""
    path = tiny_checkpoints["mixtral"]
    model = load(path, slot_counts(path)["all"], "cpu", prefetch="lookahead")
    runtime = runtime_of(model)
    hidden = torch.randn(5, 32)
    predictor = runtime.predictor
    assert isinstance(predictor, LookaheadPredictor)
    ids = predictor.router_ids(0, hidden)
    _, _, expected = model.model.layers[1].mlp.gate(hidden)
    assert torch.equal(ids, expected)
    guess = predictor.guess(0, 2, ids.flatten().numpy())  # the host copy of router_ids, as the step passes it
    assert (
        guess is not None and guess.layer == 1 and guess.experts == sorted(set(expected.flatten().tolist()))
    )
    assert predictor.router_ids(runtime.survey.num_layers - 1, hidden) is None
    assert predictor.guess(runtime.survey.num_layers - 1, 2, hidden) is None


def test_pre_attention_predicts_a_layer_from_its_input(tiny_checkpoints: dict[str, Path]) -> None:
    """The prediction for layer l is layer l's own router applied to the post-attention norm of the residual
    stream entering decoder layer l, made before the layer runs."""
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["all"], "cpu", prefetch="pre-attention")
    runtime = runtime_of(model)
    predictor = runtime.predictor
    assert isinstance(predictor, PreAttentionPredictor)
    hidden = torch.randn(5, 32)
    layer = model.model.layers[1]
    _, _, expected = layer.mlp.gate(layer.post_attention_layernorm(hidden))
    assert torch.equal(predictor.early_ids(1, hidden), expected)
    guess = predictor.guess(1, 4, expected.flatten().numpy())
    assert (
        guess is not None and guess.layer == 1 and guess.experts == sorted(set(expected.flatten().tolist()))
    )
    assert (
        predictor.router_ids(1, hidden) is None and predictor.guess(1, 4, None) is None
    )  # nothing rides along
    # In a model's forward it guesses every layer once per call, before the layer's access, from its input.
    seen: list[tuple[int, torch.Tensor]] = []
    for i, decoder_layer in enumerate(model.model.layers):
        decoder_layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.append((i, a[0] if a else kw["hidden_states"])), with_kwargs=True
        )
    with torch.no_grad():
        model(prompt("cpu"))
    score = runtime.step.prefetcher.score
    assert [i for i, _ in seen] == list(range(3)) and score.scored == [1, 1, 1]
    for i, hidden_in in seen:
        ids = predictor.early_ids(i, hidden_in.reshape(-1, 32))
        assert score.guessed[i] == len(set(ids.flatten().tolist()))


def test_pre_attention_needs_the_norm_before_the_moe_block(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["all"], "cpu")
    runtime = runtime_of(model)
    for decoder_layer in model.model.layers:
        del decoder_layer.post_attention_layernorm
    with pytest.raises(offload.OffloadError, match="norm in front of each MoE block"):
        runtime.config = dataclasses.replace(runtime.config, prefetch="pre-attention")
        attach_runtime(model, runtime)


def test_lookahead_leaves_router_logits_output_alone(tiny_checkpoints: dict[str, Path]) -> None:
    """Calling the next router early must not add entries to HF's recorded router logits."""
    path = tiny_checkpoints["mixtral"]
    plain = load(path, slot_counts(path)["all"], "cpu")
    ahead = load(path, slot_counts(path)["all"], "cpu", prefetch="lookahead")
    with torch.no_grad():
        a = plain(prompt("cpu"), output_router_logits=True).router_logits
        b = ahead(prompt("cpu"), output_router_logits=True).router_logits
    assert len(a) == len(b) == 3
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_threaded_engine_waits_for_copies_and_for_readers() -> None:
    layout = ExpertLayout(8, 4, True, False, torch.float32)
    pool = SlotPool(layout, 2, torch.device("cpu"))
    engine = ThreadedCopyEngine(pool, delay=(0.02, 0.02))
    first = torch.full((layout.nbytes,), 1, dtype=torch.uint8)
    second = torch.full((layout.nbytes,), 2, dtype=torch.uint8)
    engine.load([(0, first)])
    assert not engine.landed(0)  # 20 ms before the copy starts
    engine.acquire([0])  # waits for it
    assert engine.landed(0) and torch.equal(pool.slot(0), first)
    assert engine.stall_seconds >= 0.015
    engine.load([(0, second)])  # slot 0 is held by a reader: the copy must wait for release
    time.sleep(0.1)
    assert torch.equal(pool.slot(0), first), "a slot was overwritten while compute held it"
    engine.release([0])
    engine.synchronize()
    assert torch.equal(pool.slot(0), second)
    assert engine.copies == 2 and engine.bytes_copied == 2 * layout.nbytes
    engine.close()
    assert not any(
        t.name == "offload-copy" and t.is_alive() and t is engine._worker for t in threading.enumerate()
    )


def test_bad_prefetch_options(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["mixtral"]
    with pytest.raises(offload.OffloadError, match="prefetch must be one of"):
        load(path, 4, "cpu", prefetch="oracle")
    with pytest.raises(offload.OffloadError, match="copy_engine"):
        load(path, 4, "cpu", copy_engine="dma")


HOLD_SECONDS = 0.002  # how long each copy is held back in the stall tests
HOLD_CYCLES = 4_000_000  # the same on a GPU (torch.cuda._sleep): at least 2 ms at a 1.98 GHz H100/H200 clock


def test_stall_seconds_count_the_waits_for_held_back_copies(tiny_checkpoints: dict[str, Path]) -> None:
    """The CPU twin of the CUDA test's bound below: the copy thread holds every copy back, so compute waits for
    the first wave's copies (up to a dozen, from a cold cache) at least one hold: the stall counts that, and never
    more than the run's wall time."""
    path = tiny_checkpoints["qwen3_moe"]
    with injected_copy_delays(HOLD_SECONDS, HOLD_SECONDS):
        model = load(path, slot_counts(path)["quarter"], "cpu", prefetch="history")
    began = time.perf_counter()
    run(model)
    wall = time.perf_counter() - began
    stats = offload.stats(model)
    assert stats.expert_misses > 0
    assert HOLD_SECONDS <= stats.stall_seconds <= wall
    offload.close(model)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", ["none", "history", "lookahead", "pre-attention"])
def test_cuda_copy_stream_prefetch_equals_all_resident(
    prefetch: str, tiny_checkpoints: dict[str, Path]
) -> None:
    """The cross-stream test: prefetch copies on the copy stream while layers compute. A quarter of the experts
    in slots: enough room beside the running layer for prefetches to be issued (at top-k slots the running
    layer holds every slot and prefill runs in waves, so nothing would be prefetched). Every copy is held back
    on the copy stream (torch.cuda._sleep before it), so prefetches are still in flight when later layers
    need them, and compute waits for the first wave's demand copies at least one hold: the stall counts
    that, and never more than the run's wall time."""
    path = tiny_checkpoints["qwen3_moe"]
    ids = prompt("cuda")
    resident = load(path, slot_counts(path)["all"], "cuda", host_compute="off")  # bitwise: copy only
    model = load(path, slot_counts(path)["quarter"], "cuda", prefetch=prefetch, host_compute="off")
    engine = runtime_of(model).engine
    load_copies = engine.load

    def held_back(loads, keys=None):
        if loads:
            with torch.cuda.stream(engine.stream):
                torch.cuda._sleep(HOLD_CYCLES)
        load_copies(loads, keys)

    engine.load = held_back  # type: ignore[method-assign]
    began = time.perf_counter()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, resident(ids).logits)
    assert torch.equal(
        model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
        resident.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
    )
    stats = offload.stats(model)
    assert stats.copy_seconds > 0 and HOLD_SECONDS <= stats.stall_seconds <= time.perf_counter() - began
    if prefetch != "none":
        assert stats.prefetch_issued > 0
