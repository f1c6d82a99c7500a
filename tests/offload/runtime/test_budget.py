"""The budget planner: slots from a budget, and a BudgetError that states the true minimum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload
from offload.config import OffloadConfig
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.budget import budget_for_slots, fit_budget, plan_budget
from tests.conftest import reference_model

MiB = 2**20


def plan(budget: int, per_layer: bool = False, **kw: int):
    args = dict(
        resident_bytes=10 * MiB,
        kv_cache_bytes=4 * MiB,
        workspace_bytes=6 * MiB,
        expert_bytes=1 * MiB,
        num_layers=4,
        num_experts=8,
        top_k=2,
    )
    args.update(kw)
    return fit_budget(budget_bytes=budget, per_layer=per_layer, **args)


def test_slots_fill_what_is_left() -> None:
    p = plan(30 * MiB)
    table = 4 * 8 * 4
    assert p.slots == (30 * MiB - 20 * MiB - table) // MiB == 9
    assert p.planned_bytes <= p.budget_bytes
    assert p.planned_bytes == 20 * MiB + table + 9 * MiB


def test_slots_capped_at_every_expert() -> None:
    assert plan(10**12).slots == 32


def test_per_layer_gets_equal_shares() -> None:
    p = plan(31 * MiB, per_layer=True)
    assert p.slots % 4 == 0 and p.slots == 8
    with pytest.raises(offload.BudgetError):
        plan(25 * MiB, per_layer=True)  # 4 slots left, the minimum per layer is 2 x 4 layers


def test_minimum_is_exact() -> None:
    minimum = plan(10**12).minimum_bytes
    assert plan(minimum).slots == 2
    with pytest.raises(offload.BudgetError) as info:
        plan(minimum - 1)
    assert info.value.minimum_bytes == minimum
    assert f"({minimum} bytes" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_longer_context_leaves_fewer_slots(mixtral_checkpoint: Path) -> None:
    survey = survey_checkpoint(str(mixtral_checkpoint), torch.float32)
    short = plan_budget(survey, OffloadConfig.create("80.5MB", device="cpu", dtype="fp32", max_context=64))
    long = plan_budget(survey, OffloadConfig.create("80.5MB", device="cpu", dtype="fp32", max_context=4096))
    assert long.kv_cache_bytes == 64 * short.kv_cache_bytes
    assert long.slots < short.slots


def test_from_pretrained_at_the_stated_minimum(mixtral_checkpoint: Path) -> None:
    with pytest.raises(offload.BudgetError) as info:
        offload.from_pretrained(
            mixtral_checkpoint, vram_budget="1kB", device="cpu", max_context=64, progress=False
        )
    minimum = info.value.minimum_bytes
    model = offload.from_pretrained(
        mixtral_checkpoint, vram_budget=minimum, device="cpu", max_context=64, progress=False
    )
    survey = survey_checkpoint(str(mixtral_checkpoint))
    assert offload.stats(model).slots == survey.top_k
    with pytest.raises(offload.BudgetError):
        offload.from_pretrained(
            mixtral_checkpoint, vram_budget=minimum - 1, device="cpu", max_context=64, progress=False
        )


def test_budget_for_slots_round_trips(mixtral_checkpoint: Path) -> None:
    config = OffloadConfig.create(1, device="cpu", max_context=64)
    survey = survey_checkpoint(str(mixtral_checkpoint))
    for slots in (2, 5, 24):
        budget = budget_for_slots(survey, config, slots)
        assert plan_budget(survey, OffloadConfig.create(budget, device="cpu", max_context=64)).slots == slots


def test_resident_bytes_count_everything_but_experts(mixtral_checkpoint: Path) -> None:
    reference = reference_model(mixtral_checkpoint)
    total = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    experts = sum(p.numel() * 4 for n, p in reference.named_parameters() if ".experts." in n)
    buffers = sum(b.numel() * b.element_size() for _, b in reference.named_buffers() if b.is_floating_point())
    survey = survey_checkpoint(str(mixtral_checkpoint), torch.float32)
    assert survey.resident_bytes == total - experts + buffers


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", ["none", "lookahead"])
def test_cuda_peak_memory_stays_within_the_budget(prefetch: str, tmp_path) -> None:
    """Invariant *within-budget* on a real device: torch.cuda.max_memory_allocated since load <= the budget.
    The runtime leaves the process-wide peak counter alone; the test resets it before loading."""
    import transformers

    from tests.conftest import save_tiny

    config = transformers.MixtralConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    save_tiny(config, tmp_path / "ckpt")
    survey = survey_checkpoint(str(tmp_path / "ckpt"), torch.bfloat16)
    options = dict(device="cuda", dtype="bf16", max_context=512, prefetch=prefetch)
    budget = budget_for_slots(survey, OffloadConfig.create(1, **options), 8)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = offload.from_pretrained(tmp_path / "ckpt", vram_budget=budget, progress=False, **options)
    ids = torch.randint(0, 1024, (1, 256), device="cuda")
    model.generate(ids, max_new_tokens=64, do_sample=False)
    stats = offload.stats(model)
    assert stats.slots == 8 < stats.total_experts
    assert stats.peak_device_bytes is not None and stats.peak_device_bytes <= stats.budget_bytes


def _meta_survey(model_type: str):
    import transformers

    from offload.hf.skeleton import model_class_for
    from offload.hf.survey import survey
    from tests.tiny_models import tiny_config

    model_class, config = model_class_for(tiny_config(model_type))
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    assert isinstance(model, transformers.PreTrainedModel)
    return survey(model, torch.bfloat16), model.config


def test_workspace_counts_eager_attention_scores() -> None:
    """gpt-oss attends eagerly (its sinks rule out SDPA): three score matrices of heads x T x (T+1)."""
    import dataclasses

    s, config = _meta_survey("gpt_oss")
    heads = config.get_text_config().num_attention_heads
    assert s.eager_attention_heads == heads
    without = dataclasses.replace(s, eager_attention_heads=0)
    assert s.workspace_bytes(1024) - without.workspace_bytes(1024) == 3 * heads * 1024 * 1025 * 2
    sdpa, _ = _meta_survey("qwen3_moe")
    assert sdpa.eager_attention_heads == 0


def test_workspace_counts_the_kv_cache_growing_by_concatenation() -> None:
    """Uniform layers: the largest layer's share is the total over the layers with a cache."""
    import dataclasses

    s, config = _meta_survey("mixtral")
    layers = config.num_hidden_layers
    assert s.kv_layer_bytes_per_token * layers == s.kv_bytes_per_token > 0
    without = dataclasses.replace(s, kv_layer_bytes_per_token=0)
    assert s.workspace_bytes(512) - without.workspace_bytes(512) == s.kv_layer_bytes_per_token * 512
