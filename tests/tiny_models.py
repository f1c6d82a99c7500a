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
    "gemma4_text": {"vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16},
    "zaya": {"num_experts_per_tok": 1},
    "axk2": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 64},
    "deepseek_v32": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 64},
    "glm_moe_dsa": {"index_n_heads": 4, "index_head_dim": 16, "index_topk": 64},
}


def moe_causal_lm_types() -> dict[str, type]:
    """model_type -> causal LM class, for every type whose causal LM contains an experts-interface module.

    Found from transformers itself: a class uses the experts interface when its ``forward`` is the wrapper
    that ``transformers.integrations.moe.use_experts_implementation`` installs.
    """
    import inspect
    import sys

    from torch import nn
    from transformers.integrations import moe
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    found = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]
        except (KeyError, ImportError, AttributeError):
            continue
        module = sys.modules[model_class.__module__]
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, nn.Module)
                and getattr(getattr(obj, "forward", None), "__code__", None) is not None
                and obj.forward.__code__.co_filename == moe.__file__
            ):
                found[model_type] = model_class
                break
    return found


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    config = _tiny(CONFIG_MAPPING[model_type], {**ARCH_OVERRIDES.get(model_type, {}), **overrides})
    text = config.get_text_config()
    types = getattr(text, "layer_types", None)
    if types and "linear_attention" in types and "full_attention" not in types:
        # Linear-attention hybrids put full attention every few layers; make one of the three full.
        types = list(types)
        types[1] = "full_attention"
        config = _tiny(
            CONFIG_MAPPING[model_type], {**ARCH_OVERRIDES.get(model_type, {}), "layer_types": types}
        )
    return config


def _tiny(config_class: type, overrides: dict[str, Any]) -> transformers.PretrainedConfig:
    fields = (
        {f.name for f in dataclasses.fields(config_class)}
        if dataclasses.is_dataclass(config_class)
        else set()
    )
    kwargs = {k: v for k, v in {**SMALL, **overrides}.items() if k in fields}
    for name, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if name in fields and dataclasses.is_dataclass(sub_class):  # text, vision, audio towers: shrink each
            kwargs[name] = _tiny(
                sub_class, ARCH_OVERRIDES.get(getattr(sub_class, "model_type", ""), {})
            ).to_dict()
    return config_class(**kwargs)
