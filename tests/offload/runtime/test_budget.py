"""The budget planner: slots from a budget, and a BudgetError that states the true minimum."""

from __future__ import annotations

import dataclasses
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
    options = dict(device="cpu", dtype="fp32", prefill_chunk=None)  # the whole prompt's workspace
    short = plan_budget(survey, OffloadConfig.create("80.5MB", max_context=64, **options))
    long = plan_budget(survey, OffloadConfig.create("80.5MB", max_context=4096, **options))
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


SLACK = 64 * MiB  # the allocator slack ModelSurvey.workspace_bytes adds
# The within-budget check's shape: a small Mixtral (3 MiB experts, 28 MiB resident) whose forward over a prompt
# that fills the KV-cache reserve has activations of hundreds of MiB, so the plan's workspace estimate, not its
# slack, is what keeps the peak within the budget.
LONG_CONTEXT = 8192
LONG_NEW_TOKENS = 8


def long_prompt_config():
    import transformers

    return transformers.MixtralConfig(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
    )


def test_the_gpu_budget_shape_is_decided_by_its_workspace() -> None:
    """The CPU half of test_cuda_peak_memory_stays_within_the_budget: at LONG_CONTEXT tokens the estimate's
    activation terms are more than four times the slack, and larger than the KV cache."""
    survey, _ = _meta_survey_of(long_prompt_config())
    workspace = survey.workspace_bytes(LONG_CONTEXT)
    assert workspace - SLACK > 4 * SLACK
    assert workspace - SLACK > survey.kv_bytes_per_token * LONG_CONTEXT
    config = OffloadConfig.create(1, device="cpu", dtype="bf16", max_context=LONG_CONTEXT, prefill_chunk=None)
    plan = plan_budget(survey, dataclasses.replace(config, vram_budget=budget_for_slots(survey, config, 8)))
    assert plan.slots == 8 and plan.workspace_bytes == workspace
    assert plan.workspace_bytes > plan.planned_bytes / 2  # the largest term of the plan


@pytest.fixture(scope="module")
def long_prompt_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import save_tiny

    return save_tiny(long_prompt_config(), tmp_path_factory.mktemp("long-prompt") / "ckpt")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("prefetch", "host_compute"), [("none", "off"), ("lookahead", "off"), ("none", "auto")]
)
def test_cuda_peak_memory_stays_within_the_budget(
    prefetch: str, host_compute: str, long_prompt_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    """Invariant *within-budget* on a real device, where the workspace estimate decides: generating from a
    prompt that fills the KV-cache reserve. Since loading (the test resets the process-wide peak counters; the
    runtime leaves them alone), torch.cuda.max_memory_allocated and max_memory_reserved stay within the budget.
    And the allocated peak passes the rest of the plan (resident weights, KV cache, slot table, slots) by more
    than the slack: the activations outgrew the slack, so the estimate's activation terms were needed. (At
    the last MoE layer's sum over k alone these are live, 208 MiB beside the 52 MiB loaded: the per-pair rows
    in fp32 [T*k, H] (64 MiB), their sum (32) and its cast (16), the layer's input and the residual (16 each),
    the whole KV cache (64); the bound needs 128.) With host compute auto and no rates cached yet, the load
    probes the link and the device too, in memory the plan reserves for a forward (runtime.prepare_kernels)."""
    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path))  # no cached rates: auto probes while loading
    survey = survey_checkpoint(str(long_prompt_checkpoint), torch.bfloat16)
    options = dict(
        device="cuda",
        dtype="bf16",
        max_context=LONG_CONTEXT,
        prefill_chunk=None,  # one forward over the whole prompt: the workspace term this test is about
        prefetch=prefetch,
        host_compute=host_compute,
    )
    budget = budget_for_slots(survey, OffloadConfig.create(1, **options), 8)
    plan = plan_budget(survey, OffloadConfig.create(budget, **options))
    assert plan.slots == 8 and plan.planned_bytes == budget
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    model = offload.from_pretrained(long_prompt_checkpoint, vram_budget=budget, progress=False, **options)
    ids = torch.randint(0, 1024, (1, LONG_CONTEXT - LONG_NEW_TOKENS), device="cuda")
    model.generate(ids, max_new_tokens=LONG_NEW_TOKENS, do_sample=False)
    peak_allocated = torch.cuda.max_memory_allocated() - allocated
    peak_reserved = torch.cuda.max_memory_reserved() - reserved
    stats = offload.stats(model)
    assert stats.slots == 8 < stats.total_experts and stats.budget_bytes == budget
    assert stats.peak_device_bytes is not None and stats.peak_device_bytes <= budget
    rest = plan.planned_bytes - plan.workspace_bytes
    mib = {k: round(v / MiB, 1) for k, v in dict(allocated=peak_allocated, reserved=peak_reserved).items()}
    label = f"peaks {mib} MiB, budget {budget / MiB:.1f} MiB ({plan.describe()})"
    assert rest + SLACK < peak_allocated <= budget, label
    assert peak_reserved <= budget, label
    if host_compute == "auto":
        assert offload.stats(model).host_kernel and (tmp_path / "rates.json").is_file()  # it did probe
    offload.close(model)


def _meta_survey(model_type: str):
    from tests.tiny_models import tiny_config

    return _meta_survey_of(tiny_config(model_type))


def _meta_survey_of(hf_config):
    import transformers

    from offload.hf.skeleton import model_class_for
    from offload.hf.survey import survey

    model_class, config = model_class_for(hf_config)
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    assert isinstance(model, transformers.PreTrainedModel)
    return survey(model, torch.bfloat16), model.config


def test_workspace_counts_eager_attention_scores() -> None:
    """gpt-oss attends eagerly (its sinks rule out SDPA): three score matrices of heads x T x (T+1)."""
    s, config = _meta_survey("gpt_oss")
    heads = config.get_text_config().num_attention_heads
    assert s.eager_attention_heads == heads
    without = dataclasses.replace(s, eager_attention_heads=0)
    assert s.workspace_bytes(1024) - without.workspace_bytes(1024) == 3 * heads * 1024 * 1025 * 2
    sdpa, _ = _meta_survey("qwen3_moe")
    assert sdpa.eager_attention_heads == 0


def test_workspace_counts_the_kv_cache_growing_by_concatenation() -> None:
    """Uniform layers: the largest layer's share is the total over the layers with a cache."""
    s, config = _meta_survey("mixtral")
    layers = config.num_hidden_layers
    assert s.kv_layer_bytes_per_token * layers == s.kv_bytes_per_token > 0
    without = dataclasses.replace(s, kv_layer_bytes_per_token=0)
    assert s.workspace_bytes(512) - without.workspace_bytes(512) == s.kv_layer_bytes_per_token * 512


def test_a_chunked_prefill_plans_one_chunk() -> None:
    """With prefill chunks the workspace is one chunk's, attending to the whole context: gpt-oss's eager score
    matrices are three of heads x chunk x (context + 1), not x (context + 1) squared, and the memory goes to
    slots. ``auto`` picks a power of two of at least 256 tokens giving each expert 16 rows on average."""
    from offload.runtime.budget import prefill_chunk_of

    s, config = _meta_survey("gpt_oss")
    heads = config.get_text_config().num_attention_heads
    e = s.layout.element_size
    context, chunk = 4096, 512
    assert s.workspace_bytes(chunk, context) - s.workspace_bytes(chunk, chunk) == (
        3 * heads * chunk * (context - chunk) * e + s.kv_layer_bytes_per_token * (context - chunk)
    )
    options = dict(device="cpu", dtype="bf16", max_context=context)
    whole = OffloadConfig.create(1, prefill_chunk=None, **options)
    chunked = OffloadConfig.create(1, prefill_chunk=chunk, **options)
    budget = budget_for_slots(s, whole, 8)
    plan_whole = plan_budget(s, dataclasses.replace(whole, vram_budget=budget))
    plan_chunked = plan_budget(s, dataclasses.replace(chunked, vram_budget=budget))
    assert (plan_whole.prefill_chunk, plan_chunked.prefill_chunk) == (None, chunk)
    assert (
        plan_chunked.workspace_bytes < plan_whole.workspace_bytes / 4
        and plan_chunked.slots > plan_whole.slots
    )
    assert "prefill in chunks of 512 tokens" in plan_chunked.describe()
    auto = OffloadConfig.create(1, **options)  # prefill_chunk="auto" is the default
    assert prefill_chunk_of(s, auto) == 256  # 8 experts, top-2: 64 tokens give 16 rows each; at least 256
    wide = dataclasses.replace(s, num_experts=128, top_k=4)  # gpt-oss-120b's routing
    assert prefill_chunk_of(wide, auto) == 512
    assert prefill_chunk_of(s, OffloadConfig.create(1, prefill_chunk=4096, **options)) is None  # no shorter
    latent, _ = _meta_survey("deepseek_v3")
    assert latent.unchunked_prefill and prefill_chunk_of(latent, auto) is None
    with pytest.raises(offload.OffloadError, match="deepseek_v3 cannot prefill in chunks"):
        prefill_chunk_of(latent, chunked)
    with pytest.raises(offload.OffloadError, match="prefill_chunk must be auto"):
        OffloadConfig.create(1, prefill_chunk=0, **options)
