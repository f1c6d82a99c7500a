"""Tiny random configs for every MoE architecture transformers ships, derived from the config classes.

A config class's defaults describe the full-size model; :func:`tiny_config` overrides the size fields the
class actually declares (hidden size, layers, heads, experts, ...) and lets the class derive the rest, so
the same recipe covers architectures nobody listed by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Size fields by name, applied when the config class has them. Layers: 3, so that architectures with dense
# first layers (DeepSeek's first_k_dense_replace) get one dense and two MoE layers.
SMALL: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "shared_expert_intermediate_size": 48,
    "ffn_hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "num_local_experts": 8,
    "num_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_k": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 2,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 24,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "sliding_window": 64,
    "num_nextn_predict_layers": 0,
    "num_mtp_layers": 0,
    "mlp_only_layers": [],
    "decoder_sparse_step": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


# What the generic recipe cannot guess, by model type: hybrid layer patterns that must include an
# attention layer at 3 layers, sparse-attention indexers sized to the tiny heads, and per-architecture rules.
ARCH_OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"], "num_dense_layers": 1},
    "gemma4_text": {
        "vocab_size_per_layer_input": 128,
        "hidden_size_per_layer_input": 16,
        "enable_moe_block": True,
        "top_k_experts": 2,
    },
    "zaya": {"num_experts_per_tok": 1},
    # DeepSeek sparse attention: the indexer mask assumes as many KV heads as query heads.
    "axk2": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 64, "num_key_value_heads": 4},
    "deepseek_v32": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 64, "num_key_value_heads": 4},
    "glm_moe_dsa": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 64, "num_key_value_heads": 4},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 64,
        "indexer_compress_ratio": 4,
    },
}


def uses_experts_interface(model_class: type) -> bool:
    """True when the modeling module of ``model_class`` defines an experts class with transformers' experts
    interface: its ``forward`` is the wrapper ``use_experts_implementation`` installs."""
    import inspect
    import sys

    from transformers.integrations import moe

    module = sys.modules[model_class.__module__]
    return any(
        inspect.isclass(obj)
        and getattr(getattr(obj, "forward", None), "__code__", None) is not None
        and obj.forward.__code__.co_filename == moe.__file__
        for obj in vars(module).values()
    )


def moe_generative_types() -> dict[str, type]:
    """model_type -> generation class (causal LM, else image-text-to-text) for every model type whose
    modeling code uses the experts interface. Enumerated from transformers' own auto mappings."""
    from transformers.models.auto import modeling_auto

    found: dict[str, type] = {}
    for mapping in (
        modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING,
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING,
    ):
        for model_type in mapping._model_mapping:
            if model_type in found or model_type not in CONFIG_MAPPING:
                continue
            try:
                model_class = mapping[CONFIG_MAPPING[model_type]]
            except (KeyError, ImportError, AttributeError):
                continue
            model_class = model_class[0] if isinstance(model_class, tuple) else model_class
            if uses_experts_interface(model_class):
                found[model_type] = model_class
    return found


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    return _tiny(CONFIG_MAPPING[model_type], overrides)


def _tiny(config_class: type, overrides: dict[str, Any]) -> transformers.PretrainedConfig:
    overrides = {**ARCH_OVERRIDES.get(getattr(config_class, "model_type", ""), {}), **overrides}
    fields = (
        {f.name for f in dataclasses.fields(config_class)}
        if dataclasses.is_dataclass(config_class)
        else set()
    )
    kwargs = {k: v for k, v in {**SMALL, **overrides}.items() if k in fields}
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if name in fields and dataclasses.is_dataclass(sub_class):  # text, vision, audio towers: shrink each
            kwargs[name] = _tiny(sub_class, {}).to_dict()
    config = config_class(**kwargs)
    types = getattr(config, "layer_types", None)
    if types and set(types) == {"linear_attention"} and "layer_types" in fields:
        # Linear-attention hybrids put full attention every few layers; make one of the three full.
        return _tiny(config_class, {**overrides, "layer_types": [types[0], "full_attention", *types[2:]]})
    return config
