"""Missed experts computed on the host: results, counters, the rule's choices and failures, in the runtime.

On a CPU device host experts run the device's own kernel table (the reference for these float models), so
wherever a pair is computed its row has the same bits: outputs equal the all-resident copy-only run bitwise, at every budget and in every mode.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import offload
from cache_policies import CopyOrCompute, HostRates, simulate
from offload.hf.install import runtime_of
from offload.memory.copy_engines import injected_copy_delays
from offload.runtime.host_compute import HostComputeError
from tests.conftest import TINY_ARCHS, reference_model
from tests.helpers import ATOL, RTOL, count_uses, load, prompt, slot_counts

NEW_TOKENS = 4
# Copying and computing an expert cost the same: the rule splits a layer's misses about in half.
EVEN = HostRates.flat(link_gbps=1.0, host_gbps=1.0)


def run(model: torch.nn.Module, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt(device)
    with torch.no_grad():
        logits = model(ids).logits
    return logits, model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_host_compute_is_exact(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[arch]
    ref = reference_model(path)
    ids = prompt("cpu")
    with torch.no_grad():
        ref_logits = ref(ids).logits
    ref_tokens = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    resident_logits, _ = run(load(path, slot_counts(path)["all"], "cpu", host_compute="off"))
    counts = slot_counts(path)
    for mode, budget in (("always", "top_k"), ("auto", "top_k"), ("auto", "quarter")):
        with injected_copy_delays(0.0, 0.0005, seed=5):
            model = load(path, counts[budget], "cpu", host_compute=mode, host_rates=EVEN, prefetch="history")
        uses = count_uses(model)
        logits, tokens = run(model)
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL, msg=f"{arch} {mode} {budget}")
        assert torch.equal(tokens, ref_tokens), f"{arch} {mode} {budget}: tokens differ from HF"
        assert torch.equal(logits, resident_logits), f"{arch} {mode} {budget}: not bitwise the resident run"
        stats = offload.stats(model)
        assert stats.host_compute == mode and stats.host_kernel == "reference"
        assert stats.expert_hits + stats.expert_misses + stats.host_expert_calls == sum(uses)
        assert (
            stats.bytes_host_to_device == (stats.expert_misses + stats.prefetch_issued) * stats.expert_bytes
        )
        assert stats.host_expert_calls > 0 and stats.host_compute_seconds > 0
        if mode == "auto":  # the even rates split the misses between the link and the host
            assert stats.expert_misses > 0
        offload.close(model)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_host_compute_on_cuda_is_within_tolerance(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    """On a CUDA device a host pair runs on the CPU's kernels, which round differently from the device's: the
    results stay within tolerance of HF (not bitwise the copy-only run; test_equivalence pins that with off).
    auto with measured rates (the probes run), with even rates (a split), and always."""
    path = tiny_checkpoints[arch]
    ref = reference_model(path, "cuda")
    ids = prompt("cuda")
    with torch.no_grad():
        ref_logits = ref(ids).logits
    ref_tokens = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    counts = slot_counts(path)
    for mode, budget, rates in (
        ("auto", "quarter", None),
        ("auto", "top_k", EVEN),
        ("always", "top_k", None),
    ):
        model = load(path, counts[budget], "cuda", host_compute=mode, host_rates=rates, prefetch="history")
        uses = count_uses(model)
        logits, tokens = run(model, "cuda")
        label = f"{arch} {mode} {budget} {'measured' if rates is None else 'even'} rates"
        torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL, msg=label)
        assert torch.equal(tokens, ref_tokens), f"{label}: tokens differ from HF"
        stats = offload.stats(model)
        assert stats.host_compute == mode, label
        assert stats.expert_hits + stats.expert_misses + stats.host_expert_calls == sum(uses), label
        if rates is not None or mode == "always":
            assert stats.host_expert_calls > 0 and stats.host_kernel != "", label
        offload.close(model)


def test_always_admits_nothing(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["half"], "cpu", host_compute="always")
    run(model)
    stats = offload.stats(model)
    assert stats.expert_hits == stats.expert_misses == stats.bytes_host_to_device == 0
    assert stats.host_expert_calls == stats.expert_uses > 0
    assert runtime_of(model).cache.resident() == {}


def test_auto_on_cpu_is_off_without_rates(tiny_checkpoints: dict[str, Path]) -> None:
    model = load(tiny_checkpoints["mixtral"], 4, "cpu")  # the default: auto
    run(model)
    stats = offload.stats(model)
    assert stats.host_compute == "off" and stats.host_expert_calls == 0 and stats.expert_misses > 0


def test_runtime_and_simulator_split_the_same(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["qwen3_moe"]
    model = load(
        path, 9, "cpu", host_compute="auto", host_rates=EVEN, record_trace=True, policy="lfu", prefetch="none"
    )
    run(model)
    stats = offload.stats(model)
    runtime = runtime_of(model)
    rule = CopyOrCompute("auto", runtime.survey.layout.nbytes, EVEN)
    result = simulate(offload.routing_trace(model), "lfu", runtime.cache.capacity, "global", host=rule)
    assert (result.hits, result.misses, result.host_computed) == (
        stats.expert_hits,
        stats.expert_misses,
        stats.host_expert_calls,
    )
    assert result.host_computed > 0 and result.misses > 0


def test_a_failing_host_thread_raises_a_clear_error(tiny_checkpoints: dict[str, Path]) -> None:
    model = load(tiny_checkpoints["mixtral"], 2, "cpu", host_compute="always", host_threads=3)
    run(model)  # sets the host kernel up

    def broken(*args: object) -> torch.Tensor:
        raise MemoryError("out of host memory")

    runtime_of(model).step.host.table = SimpleNamespace(kernel_for=lambda tokens: broken)
    with pytest.raises(HostComputeError, match=r"expert \d+ of MoE layer 0 on the host failed: MemoryError"):
        run(model)
    offload.close(model)


def test_bad_options(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(offload.OffloadError, match="host_compute must be one of"):
        load(tiny_checkpoints["mixtral"], 4, "cpu", host_compute="sometimes")
    with pytest.raises(offload.OffloadError, match="host_threads"):
        load(tiny_checkpoints["mixtral"], 4, "cpu", host_threads=0)


def test_host_compute_is_set_up_at_load_within_the_memory_a_forward_reserves(
    tiny_checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel and rates are resolved once, while loading, before any forward: the probes' device buffers
    get the workspace and KV cache the plan reserves for a forward (which nothing holds yet), so a first
    forward on CUDA never has them on top of its own activations."""
    from offload.runtime import host_rates

    seen: list[int | None] = []
    resolve = host_rates.resolve

    def recording(*args, device_room: int | None = None, **kwargs):
        seen.append(device_room)
        return resolve(*args, device_room=device_room, **kwargs)

    monkeypatch.setattr(host_rates, "resolve", recording)
    path = tiny_checkpoints["qwen3_moe"]
    model = load(path, slot_counts(path)["quarter"], "cpu", host_compute="always")
    plan = runtime_of(model).budget
    assert seen == [plan.workspace_bytes + plan.kv_cache_bytes]
    with torch.no_grad():
        model(prompt("cpu"))
    assert len(seen) == 1 and offload.stats(model).host_expert_calls > 0


def test_the_device_probes_fit_the_room_they_are_given() -> None:
    """Half the room each: the link probe copies fewer 4 MiB chunks, the device probe a narrower expert."""
    from offload.memory.layout import ExpertLayout
    from offload.runtime.host_rates import link_chunks, probe_intermediate

    mib = 1 << 20
    assert link_chunks(None) == 16 and link_chunks(1 << 30) == 16 and link_chunks(10 * mib) == 2
    assert link_chunks(1) == 1
    mixtral = ExpertLayout(4096, 14336, True, False, torch.bfloat16)  # 336 MiB of dense matrices
    assert probe_intermediate(mixtral, None) == probe_intermediate(mixtral, 1 << 30) == 14336
    narrow = probe_intermediate(mixtral, 48 * mib)
    assert 0 < narrow < 14336 and (2 * narrow + narrow) * 4096 * 2 + 4 * 4096 * 2 <= 48 * mib
    assert (2 * (narrow + 1) + narrow + 1) * 4096 * 2 + 4 * 4096 * 2 > 48 * mib  # the most that fits
