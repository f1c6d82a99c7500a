"""Real model shapes for benchmarks, from transformers' config classes (random weights are built elsewhere).

Each config class's defaults describe the checkpoint its docstring names, except where that checkpoint's
config.json differs (stated per shape below). ``SMOKE_SHAPES`` are the same architectures at tiny widths,
for CPU smoke runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int  # the checkpoint's depth
    config: Callable[..., transformers.PretrainedConfig]  # (**overrides) -> config
    source: str

    def build_config(self, layers: int) -> transformers.PretrainedConfig:
        return self.config(num_hidden_layers=layers)


def _mixtral(**overrides: Any) -> transformers.PretrainedConfig:
    import transformers

    # MixtralConfig() is documented as mistralai/Mixtral-8x7B-v0.1 and matches it: hidden 4096, intermediate
    # 14336, 32 layers, 32 heads, 8 KV heads, 8 experts, top-2, vocab 32000 (352 MB per bf16 expert).
    return transformers.MixtralConfig(**overrides)


def _qwen3(**overrides: Any) -> transformers.PretrainedConfig:
    import transformers

    # Qwen3MoeConfig() is documented as Qwen/Qwen3-30B-A3B-Base but has 24 layers and no head_dim (so
    # 2048 / 32 = 64); the checkpoint has 48 layers, head_dim 128 and norm_topk_prob. The defaults match the
    # rest: hidden 2048, moe_intermediate 768, 32 heads, 4 KV heads, 128 experts, top-8, vocab 151936
    # (9.4 MB per bf16 expert).
    checkpoint = dict(num_hidden_layers=48, head_dim=128, norm_topk_prob=True, max_position_embeddings=40960)
    return transformers.Qwen3MoeConfig(**{**checkpoint, **overrides})


def _olmoe(**overrides: Any) -> transformers.PretrainedConfig:
    import transformers

    # OlmoeConfig() is documented as allenai/OLMoE-1B-7B-0924 but has intermediate_size 2048; the
    # checkpoint's is 1024 (12.6 MB per bf16 expert). The defaults match the rest: hidden 2048, 16 layers,
    # 16 heads, 16 KV heads, 64 experts, top-8, vocab 50304. The shared trace was recorded on that checkpoint.
    return transformers.OlmoeConfig(**{"intermediate_size": 1024, **overrides})


SHAPES = {
    "mixtral-8x7b": Shape(
        "mixtral-8x7b", 32, _mixtral, "MixtralConfig defaults (mistralai/Mixtral-8x7B-v0.1)"
    ),
    "qwen3-30b-a3b": Shape(
        "qwen3-30b-a3b",
        48,
        _qwen3,
        "Qwen3MoeConfig + the checkpoint's 48 layers, head_dim 128 (Qwen3-30B-A3B)",
    ),
    "olmoe-1b-7b": Shape(
        "olmoe-1b-7b",
        16,
        _olmoe,
        "OlmoeConfig + the checkpoint's intermediate 1024 (allenai/OLMoE-1B-7B-0924)",
    ),
}
# The same architectures at tiny widths (the OLMoE one keeps the trace's 16 layers x 64 experts x top-8).
_TINY = dict(vocab_size=256, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)
SMOKE_SHAPES = {
    "mixtral-8x7b": Shape(
        "mixtral-tiny", 4, lambda **o: _mixtral(**_TINY, intermediate_size=48, **o), "Mixtral, tiny widths"
    ),
    "qwen3-30b-a3b": Shape(
        "qwen3-tiny",
        4,
        lambda **o: _qwen3(
            **_TINY, moe_intermediate_size=24, head_dim=8, num_experts=16, num_experts_per_tok=4, **o
        ),
        "Qwen3-MoE, tiny widths",
    ),
    "olmoe-1b-7b": Shape(
        "olmoe-tiny",
        16,
        lambda **o: _olmoe(**{**_TINY, "num_key_value_heads": 4}, intermediate_size=16, **o),
        "OLMoE with the trace's 16 layers x 64 experts x top-8, tiny widths",
    ),
}
