"""Random-weight models of a real shape built into the host store, and routing forced from a trace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import offload
from cache_policies import load_trace
from offload.config import OffloadConfig
from offload.hf.install import runtime_of
from offload_bench.forced_routing import ForcedRouting
from offload_bench.synthetic import random_offloaded
from tests.helpers import TRACES
from tests.tiny_models import tiny_config

OLMOE_TRACE = TRACES / "olmoe-1b-7b_decode_299.jsonl"


def olmoe_shaped(**options) -> torch.nn.Module:
    """An OLMoE-shaped (16 MoE layers, 64 experts, top-8) model, small widths."""
    config = tiny_config("olmoe", num_hidden_layers=16, num_experts=64, num_experts_per_tok=8)
    offload_config = OffloadConfig.create("80MB", device="cpu", dtype="fp32", max_context=64, **options)
    return random_offloaded(config, offload_config, progress=False)


def test_random_model_is_complete_and_initialized() -> None:
    model = olmoe_shaped()
    runtime = runtime_of(model)
    assert runtime.store.complete and runtime.survey.total_experts == 16 * 64
    reference = transformers.AutoModelForCausalLM.from_config(model.config)
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert not any(p.is_meta or not torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    out = model.generate(torch.randint(3, 128, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7) and offload.stats(model).expert_misses > 0


def test_forced_routing_replays_the_trace() -> None:
    model = olmoe_shaped(record_trace=True)
    trace = load_trace(OLMOE_TRACE)
    offload.override_routing(model, ForcedRouting(trace, 16, 64, 8))
    model.generate(torch.randint(3, 128, (1, 3)), max_new_tokens=5, do_sample=False)  # 3 + 4 tokens routed
    recorded = offload.routing_trace(model)
    assert np.array_equal(np.sort(recorded.ids, axis=-1), np.sort(trace.ids[:7], axis=-1))


def test_forced_routing_refuses_a_trace_of_another_shape() -> None:
    with pytest.raises(ValueError, match="16 layers x top-8"):
        ForcedRouting(load_trace(OLMOE_TRACE), 12, 64, 8)
