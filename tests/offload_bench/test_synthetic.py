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


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_each_layer_holds_the_bank_as_loading_would_store_it(quantize: str | None) -> None:
    """The bank packed once (quantized once, for int4) gives every layer the very bytes the store's own fill
    from HF expert weights gives: layer l's expert e is bank expert (e + l) % 8, more experts than the bank."""
    from transformers import AutoModelForCausalLM

    from offload.hf.survey import expert_param_names, experts_modules
    from offload.memory.host_store import HostExpertStore
    from offload_bench.synthetic import BANK_EXPERTS, ExpertBank

    config = tiny_config("olmoe", num_hidden_layers=3, num_experts=12, num_experts_per_tok=4)
    options = dict(device="cpu", dtype="fp32", max_context=64, quantize=quantize, store_cache=False)
    model = random_offloaded(config, OffloadConfig.create("80MB", **options), seed=3, progress=False)
    runtime = runtime_of(model)
    layout = runtime.survey.layout
    assert layout.format == ("int4" if quantize else "float") and runtime.survey.num_experts > BANK_EXPERTS
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    shapes = {p: getattr(experts_modules(plain)[0][1], p).shape for p in expert_param_names(layout)}
    bank = ExpertBank(config.initializer_range, torch.float32, 3)
    store = HostExpertStore(layout, num_layers=3, num_experts=12, pin=False)
    for layer in range(3):
        store.fill_layer(layer, {p: bank.experts(p, shape, layer) for p, shape in shapes.items()})
        for e in range(12):
            assert torch.equal(runtime.store.expert(layer, e), store.expert(layer, e)), (layer, e)
    assert torch.equal(store.expert(0, 1), store.expert(1, 0))  # the bank's mix, one step per layer


def test_large_weights_repeat_one_tile_and_small_ones_are_left() -> None:
    from offload_bench.synthetic import TILE, fill_large_weights

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = torch.nn.Parameter(torch.zeros(3 * TILE + 5))
            self.small = torch.nn.Parameter(torch.zeros(10))

    module = Two()
    fill_large_weights(module, std=0.02, seed=0)  # type: ignore[arg-type]
    big = module.big.detach()
    assert torch.isfinite(big).all() and 0.019 < float(big[:TILE].std()) < 0.021
    assert torch.equal(big[:TILE], big[TILE : 2 * TILE]) and torch.equal(big[3 * TILE :], big[:5])
    assert module.big._is_hf_initialized and not hasattr(module.small, "_is_hf_initialized")
    assert not module.small.detach().any()  # left to initialize_weights


def test_a_random_model_on_the_disk_tier_computes_the_same(tmp_path, monkeypatch) -> None:
    """disk_tier="always": the experts go to a disk store keyed by config, seed and format, a second build
    only swaps the modules, and both compute what the all-in-RAM random model computes."""
    from offload_bench.e2e_runs import host_tier_limit
    from offload_bench.synthetic import shape_survey

    monkeypatch.setenv("MOE_OFFLOAD_CACHE", str(tmp_path))
    config = tiny_config("olmoe", num_hidden_layers=4, num_experts=16, num_experts_per_tok=4)
    ram = OffloadConfig.create("80MB", device="cpu", dtype="fp32", max_context=64)
    limit = host_tier_limit(shape_survey(config, torch.float32), ram, 0.25)
    disk = OffloadConfig.create(
        "80MB", device="cpu", dtype="fp32", max_context=64, disk_tier="always", host_memory_limit=limit
    )
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = random_offloaded(config, ram, progress=False)(ids).logits
        for source in ("stored on disk", "read from the disk store"):
            model = random_offloaded(config, disk, progress=False)
            runtime = runtime_of(model)
            assert runtime.tier is not None and runtime.tier.pool.num_slots == 16  # a quarter of 64
            assert torch.equal(model(ids).logits, expected)
            assert (
                source in runtime.tier.disk.describe("disk store", "written")
                and offload.stats(model).disk_reads
            )
