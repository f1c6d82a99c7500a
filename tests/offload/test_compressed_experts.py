"""Experts stored compressed: quantized while loading, they give the dequantize-then-compute model's results,
bitwise the same at every budget; slots are counted in compressed bytes; the counters say the format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload
from offload.hf.install import runtime_of
from offload.memory import formats
from tests.conftest import reference_model
from tests.helpers import load, prompt, slot_counts

NEW_TOKENS = 6


def oracle(path: Path, fmt: str, group: int) -> torch.nn.Module:
    """The unmodified transformers model with every expert weight replaced by its quantized-then-read-back
    values: what an offloaded model in ``fmt`` computes, up to summation order."""
    model = reference_model(path)
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "gate_up_proj") or not hasattr(module, "num_experts"):
                continue
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(module, name)  # [E, out, in]: the canonical orientation for these models
                for e in range(weight.shape[0]):
                    fields = formats.quantize(weight[e], "m", fmt, group, torch.float32)
                    weight[e] = formats.dequantize(fields, "m", fmt, weight.shape[-1], group, torch.float32)
    return model


@pytest.mark.parametrize(("fmt", "group"), [("int4", 64), ("int4", 32), ("int8", 0)])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
def test_quantized_equals_the_dequantized_oracle_at_every_budget(
    arch: str, fmt: str, group: int, tiny_checkpoints: dict[str, Path]
) -> None:
    path = tiny_checkpoints[arch]
    options = {"quantize": fmt, "quantize_group": group or 64}
    ids = prompt("cpu")
    expected = oracle(path, fmt, group or 64)
    with torch.no_grad():
        want_logits = expected(ids).logits
    want_tokens = expected.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    runs = {}
    for budget in ("top_k", "all"):
        model = load(path, slot_counts(path)[budget], "cpu", **options)
        with torch.no_grad():
            logits = model(ids).logits
        runs[budget] = logits
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), want_tokens)
        stats = offload.stats(model)
        assert stats.expert_format == (fmt if group in (0, 64) else f"int4-g{group}")
        assert stats.expert_bytes == runtime_of(model).survey.layout.nbytes
    assert torch.equal(runs["top_k"], runs["all"])  # bitwise the same whatever the budget


def test_slots_are_counted_in_compressed_bytes(tiny_checkpoints: dict[str, Path]) -> None:
    """At the same budget an int4 model holds more experts than a float one, and says so."""
    path = tiny_checkpoints["qwen3_moe"]
    plain = load(path, 12, "cpu")
    budget = runtime_of(plain).budget.budget_bytes
    packed = offload.from_pretrained(
        path, vram_budget=budget, device="cpu", dtype="fp32", max_context=64, quantize="int4", progress=False
    )
    a, b = offload.stats(plain), offload.stats(packed)
    assert (a.expert_format, b.expert_format) == ("fp32", "int4")
    assert b.expert_bytes < a.expert_bytes / 2 and b.slots > a.slots  # tiny fp32 experts: padding shows
    assert b.bytes_host_to_device == b.expert_misses * b.expert_bytes or b.expert_misses == 0


def test_bad_format_options(tiny_checkpoints: dict[str, Path]) -> None:
    path = tiny_checkpoints["mixtral"]
    with pytest.raises(offload.OffloadError, match="quantize must be int4, int8 or none"):
        load(path, 4, "cpu", quantize="int3")
    with pytest.raises(offload.OffloadError, match="quantize_group"):
        load(path, 4, "cpu", quantize="int4", quantize_group=48)
