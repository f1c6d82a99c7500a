"""Quantization error against full precision: zero for the same format, small for int8, larger for int4; the
first MoE layer's error is measured where its input is identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import offload
from offload_bench.quant_error import compare, first_moe_block


def load(path: Path, **options) -> torch.nn.Module:
    return offload.from_pretrained(
        path, vram_budget="1GB", device="cpu", dtype="fp32", max_context=64, progress=False, **options
    )


def test_errors_grow_as_bits_shrink(mixtral_checkpoint: Path) -> None:
    models = {
        "reference": load(mixtral_checkpoint),
        "same": load(mixtral_checkpoint),
        "int8": load(mixtral_checkpoint, quantize="int8"),
        "int4": load(mixtral_checkpoint, quantize="int4"),
    }
    try:
        assert first_moe_block(models["int8"]) is models["int8"].get_submodule("model.layers.0.mlp")
        inputs = list(torch.randint(3, 128, (4, 33), generator=torch.Generator().manual_seed(0)))
        nbytes = torch.ones(128, dtype=torch.long)
        variants = {name: model for name, model in models.items() if name != "reference"}
        rows = compare(models["reference"], variants, inputs, nbytes)
    finally:
        for model in models.values():
            offload.close(model)
    for name in ("reference", "same"):
        assert rows[name]["layer_rel_err"] == 0 and rows[name]["logits_rel_err"] == 0
        assert rows[name]["greedy_agreement"] == 1 and rows[name]["positions"] == 4 * 32
    assert rows["same"]["bits_per_byte"] == rows["reference"]["bits_per_byte"]
    assert 0 < rows["int8"]["layer_rel_err"] < 0.02 < rows["int4"]["layer_rel_err"] < 0.5
    assert rows["int8"]["logits_rel_err"] < rows["int4"]["logits_rel_err"]
    assert rows["int8"]["greedy_agreement"] >= rows["int4"]["greedy_agreement"]


def test_needs_an_offloaded_model() -> None:
    with pytest.raises(offload.OffloadError):
        first_moe_block(torch.nn.Linear(2, 2))
