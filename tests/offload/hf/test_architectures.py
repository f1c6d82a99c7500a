"""Every MoE architecture of the installed transformers: offloaded generation equals the unmodified model.

The list comes from transformers itself (offload.hf.architectures reads its auto mappings), and is cross-
checked here against a plain scan of transformers' modeling sources for ``@use_experts_implementation``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import transformers

import offload
from offload.config import OffloadConfig
from offload.hf.architectures import LIMITATIONS, UNCHUNKED_PREFILL, architectures, supported_model_types
from offload.hf.install import runtime_of
from offload.hf.skeleton import model_class_for, survey_checkpoint
from offload.runtime.budget import budget_for_slots
from tests.conftest import save_tiny
from tests.tiny_models import tiny_config

ARCHS = {a.model_type: a for a in architectures()}
MODEL_CLASSES = {
    a.model_type: getattr(transformers, a.model_class)
    for a in architectures()
    if a.experts_classes and a.model_class
}
ATOL = RTOL = 1e-5  # fp32 on CPU
# Sparse-attention indexers that call nonzero(), which cannot run on the meta device.
KV_FORMULA_ONLY = {"glm5_next", "qwen4_exp", "qwen4_exp_text"}
# What prefetch="auto" falls back to where pre-attention cannot run: lookahead for decoder layers without a
# norm in front of the MoE block; none for routers that need more than a hidden state (a bias, the input ids,
# a 3-d input) or return only logits (jamba's plain Linear). Every other type gets pre-attention.
AUTO_LOOKAHEAD = {"cohere2_moe", "gemma4", "gemma4_text", "nemotron_h", "qwen4_exp", "qwen4_exp_text"}
AUTO_NONE = {"afmoe", "deepseek_v4", "hy_v3", "jamba", "lfm2_moe", "minimax_m2", "zaya"}


def test_list_matches_a_scan_of_transformers_sources() -> None:
    """Every modeling module that declares an experts class with the interface is accounted for."""
    models = Path(transformers.__file__).parent / "models"
    decorated = {
        path.parent.name
        for path in models.glob("*/modeling_*.py")
        if re.search(r"^@use_experts_implementation", path.read_text(), re.M)
    }
    assert len(decorated) >= 50  # transformers 5.17 has 56 such modules
    listed_modules = {
        getattr(transformers, a.model_class).__module__.split(".")[2]
        for a in architectures()
        if a.experts_classes
    }
    assert decorated <= listed_modules, f"not accounted for: {sorted(decorated - listed_modules)}"
    assert len(supported_model_types()) >= 50
    assert set(LIMITATIONS) <= set(ARCHS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("archs")


def build(model_type: str, root: Path) -> Path:
    """A checkpoint as the hub has them: a vision-language model's is saved whole, with its vision tower."""
    path = root / model_type
    if not (path / "config.json").exists():
        config = tiny_config(model_type)
        whole = transformers.AutoModelForImageTextToText._model_mapping.get(type(config), None)
        save_tiny(config, path, model_class=whole or MODEL_CLASSES[model_type])
    return path


def offloaded(path: Path, slots: int, max_context: int = 64, **options) -> torch.nn.Module:
    chunk = {k: v for k, v in options.items() if k == "prefill_chunk"}  # it sizes the workspace
    config = OffloadConfig.create(1, device="cpu", dtype="fp32", max_context=max_context, **chunk)
    budget = budget_for_slots(survey_checkpoint(str(path), torch.float32), config, slots)
    return offload.from_pretrained(
        path,
        vram_budget=budget,
        device="cpu",
        dtype="fp32",
        max_context=max_context,
        progress=False,
        **options,
    )


@pytest.mark.parametrize("model_type", supported_model_types())
def test_offloaded_generation_equals_transformers(model_type: str, checkpoints: Path) -> None:
    path = build(model_type, checkpoints)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    model_class, _ = model_class_for(transformers.AutoConfig.from_pretrained(path))
    reference = model_class.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected_logits = reference(ids).logits
    expected = reference.generate(ids, max_new_tokens=5, do_sample=False)

    survey = survey_checkpoint(str(path), torch.float32)
    results = []
    for slots in (survey.top_k, survey.total_experts):  # one layer's top-k (waves in prefill) and everything
        model = offloaded(path, slots)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=RTOL)
        assert torch.equal(tokens, expected), f"{model_type} with {slots} slots: greedy tokens differ"
        stats = offload.stats(model)
        assert stats.slots == slots and stats.expert_misses > 0
        assert stats.prefetch == (auto_prefetch(model_type) if slots < survey.total_experts else "none")
        results.append(logits)
    assert torch.equal(results[0], results[1]), "budget changed the logits"


@pytest.mark.parametrize("model_type", supported_model_types())
def test_chunked_prefill_equals_transformers(model_type: str, checkpoints: Path) -> None:
    """A 100-token prompt prefilled in chunks of 24 (the last one shorter), past the tiny models' 64-token
    sliding window: the greedy tokens of transformers' generate over the whole prompt, for every attention
    family the supported types use (eager, sdpa, sliding window, linear attention, state-space layers). The
    types listed in UNCHUNKED_PREFILL are those whose chunked prefill fails or differs in transformers itself
    (checked here, so the list stays true): they prefill whole prompts, and a chunk size given is refused."""
    path = build(model_type, checkpoints)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(1))
    model_class, _ = model_class_for(transformers.AutoConfig.from_pretrained(path))
    reference = model_class.from_pretrained(path, dtype=torch.float32).eval()
    expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
    survey = survey_checkpoint(str(path), torch.float32)
    if model_type in UNCHUNKED_PREFILL:
        try:
            chunked = reference.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=24)
        except Exception:
            chunked = None
        assert chunked is None or not torch.equal(chunked, expected), f"{model_type} chunks fine now"
        model = offloaded(path, survey.top_k, max_context=128)  # prefill_chunk auto: whole prompts
        assert runtime_of(model).budget.prefill_chunk is None
        assert model.generation_config.prefill_chunk_size is None
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected)
        with pytest.raises(offload.OffloadError, match=f"{model_type} cannot prefill in chunks"):
            offloaded(path, survey.top_k, max_context=128, prefill_chunk=24)
        return
    model = offloaded(path, survey.top_k, max_context=128, prefill_chunk=24)
    assert runtime_of(model).budget.prefill_chunk == 24 == model.generation_config.prefill_chunk_size
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, expected), f"{model_type}: chunked prefill changed the greedy tokens"
    stats = offload.stats(model)
    decode_steps = tokens.shape[1] - ids.shape[1] - 1  # the first new token comes from the last chunk
    assert stats.layer_calls == survey.num_layers * (5 + decode_steps)  # five prefill chunks
    assert stats.prefill_chunk == 24


def auto_prefetch(model_type: str) -> str:
    return (
        "lookahead"
        if model_type in AUTO_LOOKAHEAD
        else "none"
        if model_type in AUTO_NONE
        else "pre-attention"
    )


@pytest.mark.parametrize(("model_type", "prefetch"), [("afmoe", "lookahead"), ("jamba", "pre-attention")])
def test_a_router_predictor_the_model_cannot_serve_fails_before_loading(
    model_type: str, prefetch: str, checkpoints: Path
) -> None:
    """afmoe's router needs its expert bias passed in; jamba's returns only logits: one line, no weight read."""
    path = build(model_type, checkpoints)
    with pytest.raises(offload.UnsupportedModelError, match="use prefetch='history'") as err:
        offloaded(path, 4, prefetch=prefetch)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model_type", sorted(LIMITATIONS))
def test_known_limitations_fail_clearly(model_type: str, checkpoints: Path) -> None:
    path = build(model_type, checkpoints)
    with pytest.raises(offload.UnsupportedModelError) as err:
        offload.from_pretrained(path, vram_budget="1GB", device="cpu", progress=False)
    message = str(err.value)
    assert LIMITATIONS[model_type] in message and "supported: " in message and "mixtral" in message
    assert "\n" not in message


@pytest.mark.parametrize("model_type", supported_model_types())
def test_kv_cache_estimate_matches_the_cache(model_type: str, checkpoints: Path) -> None:
    """The budget's KV bytes per token equal what the model's cache grows by per token (below any window),
    measured on the meta device; only the architectures that cannot run there use a formula."""
    path = build(model_type, checkpoints)
    model = offloaded(path, 10**6)

    def cache_bytes(tokens: int) -> int:
        ids = torch.randint(3, 128, (1, tokens), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        return sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in vars(layer).values()
            if isinstance(t, torch.Tensor)
        )

    grown = (cache_bytes(12) - cache_bytes(4)) // 8
    survey = runtime_of(model).survey
    if survey.kv_measured:
        assert grown == survey.kv_bytes_per_token
    else:  # the model cannot run on the meta device: a config formula stands in (README: known gaps)
        assert model_type in KV_FORMULA_ONLY
        assert survey.kv_bytes_per_token > 0


@pytest.mark.parametrize("model_type", ["qwen3_moe", "glm5_next"])
def test_kv_answer_is_kept_per_config_and_dtype(
    model_type: str, checkpoints: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load surveys a config more than once: the meta run's answer is kept per class, config and dtype, and
    where the formula stands in, every survey still says so."""
    path = build(model_type, checkpoints)
    with caplog.at_level(logging.WARNING, logger="offload.hf.survey"):
        first = survey_checkpoint(str(path), torch.float32)
        again = survey_checkpoint(str(path), torch.float32)
        half = survey_checkpoint(str(path), torch.bfloat16)
    assert first.kv_bytes_per_token == again.kv_bytes_per_token == 2 * half.kv_bytes_per_token > 0
    warnings = sum("estimated from its config" in r.getMessage() for r in caplog.records)
    assert warnings == (3 if model_type in KV_FORMULA_ONLY else 0)
