"""Offloading never changes results: every architecture, every budget, against HF and the all-resident run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload
from offload.hf.experts import OffloadedExperts
from offload.hf.install import runtime_of
from offload.hf.skeleton import survey_checkpoint
from tests.conftest import DEVICES, TINY_ARCHS, reference_model
from tests.helpers import ATOL, NEW_TOKENS, RTOL, count_uses, load, prompt, slot_counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_offloaded_equals_hf_at_every_budget(
    arch: str, device: str, tiny_checkpoints: dict[str, Path]
) -> None:
    path = tiny_checkpoints[arch]
    ids = prompt(device)
    ref = reference_model(path, device)
    with torch.no_grad():
        ref_logits = ref(ids).logits
    ref_tokens = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)

    counts = slot_counts(path)
    resident_logits = None
    for name, slots in sorted(counts.items(), key=lambda kv: -kv[1]):  # "all" first: the all-resident run
        # host_compute off: on a CUDA device auto would compute some pairs on the CPU, whose kernels round
        # differently from the device's (within tolerance, tests/offload/runtime/test_host_compute.py), and
        # which pairs go there depends on the budget; copy-only, any budget gives the same bits
        model = load(path, slots, device, host_compute="off")
        uses = count_uses(model)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)

        torch.testing.assert_close(
            logits, ref_logits, atol=ATOL, rtol=RTOL, msg=f"{arch} {name} logits vs HF"
        )
        assert torch.equal(tokens, ref_tokens), (
            f"{arch} at {name} ({slots} slots): greedy tokens differ from HF"
        )
        if resident_logits is None:
            resident_logits = logits
        else:  # same kernels, any budget: bitwise identical
            assert torch.equal(logits, resident_logits), (
                f"{arch} at {name}: logits differ from the all-resident run"
            )

        stats = offload.stats(model)
        runtime = runtime_of(model)
        assert stats.slots == slots
        assert stats.expert_hits + stats.expert_misses == sum(uses) == stats.expert_uses
        # the default prefetch="auto": pre-attention (these models have the norm in front of the MoE block),
        # none when every expert fits; a prefetched expert is copied whole, like a missed one
        assert stats.prefetch == ("pre-attention" if slots < stats.total_experts else "none")
        assert stats.bytes_host_to_device == (
            (stats.expert_misses + stats.prefetch_issued) * runtime.survey.layout.nbytes
        )
        assert stats.layer_calls == len(uses)
        if slots < stats.total_experts:
            assert stats.expert_misses > 0 and stats.evictions > 0
        else:  # everything fits: each expert is copied at most once
            assert stats.expert_misses <= stats.total_experts and stats.evictions == 0


def test_min_budget_runs_prefill_in_waves(mixtral_checkpoint: Path) -> None:
    """With only top-k slots, a 12-token prefill needs more experts per layer than slots: waves."""
    counts = slot_counts(mixtral_checkpoint)
    model = load(mixtral_checkpoint, counts["top_k"], "cpu")
    with torch.no_grad():
        model(prompt("cpu"))
    stats = offload.stats(model)
    assert stats.waves > stats.layer_calls


def test_per_layer_cache_scope_matches(mixtral_checkpoint: Path) -> None:
    s = survey_checkpoint(str(mixtral_checkpoint), torch.float32)
    ids = prompt("cpu")
    ref = reference_model(mixtral_checkpoint)
    model = load(mixtral_checkpoint, s.top_k * s.num_layers, "cpu", cache_scope="layer")
    assert torch.equal(
        model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
        ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False),
    )
    assert offload.stats(model).slots == s.top_k * s.num_layers


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_wrap_a_model_loaded_on_cpu(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints[arch]
    ids = prompt("cpu")
    ref = reference_model(path)
    expected = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    model = offload.wrap(
        reference_model(path), vram_budget="1GB", device="cpu", max_context=64, progress=False
    )
    assert not any(isinstance(p, torch.nn.Parameter) and "experts" in n for n, p in model.named_parameters())
    assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
    assert offload.stats(model).slots == offload.stats(model).total_experts


def test_shared_expert_stays_resident(tiny_checkpoints: dict[str, Path]) -> None:
    model = load(tiny_checkpoints["qwen2_moe"], 4, "cpu")
    block = model.model.layers[0].mlp
    assert isinstance(block.experts, OffloadedExperts)
    assert all(p.device.type == "cpu" and not p.is_meta for p in block.shared_expert.parameters())
    survey = runtime_of(model).survey
    shared = sum(p.numel() * 4 for layer in model.model.layers for p in layer.mlp.shared_expert.parameters())
    assert survey.resident_bytes > shared  # shared experts count against the budget, with the rest


def test_stats_as_dict_is_complete(mixtral_checkpoint: Path) -> None:
    model = load(mixtral_checkpoint, 4, "cpu")
    model.generate(prompt("cpu"), max_new_tokens=2, do_sample=False)
    d = offload.stats(model).as_dict()
    for key in (
        "expert_hits",
        "expert_misses",
        "bytes_host_to_device",
        "copy_seconds",
        "slots",
        "total_experts",
        "budget_bytes",
        "planned_bytes",
        "peak_device_bytes",
        "hit_rate",
    ):
        assert key in d
    assert d["planned_bytes"] <= d["budget_bytes"]
    assert d["copy_seconds"] > 0
