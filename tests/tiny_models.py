"""Tiny random configs for every MoE architecture transformers ships, derived from the config classes; the
four architectures of the core runtime at hand-picked sizes (``TINY_ARCHS``); saving a tiny random model.

A config class's defaults describe the full-size model; :func:`tiny_config` overrides the size fields the
class actually declares (hidden size, layers, heads, experts, ...) and lets the class derive the rest, so
the same recipe covers architectures nobody listed by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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
    "diffusion_gemma": {"vision_config": {"model_type": "gemma4_vision"}},
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse", "sparse"]},
    "glm5_next_text": {
        "linear_num_heads": 4,  # its linear-attention layers, at tiny sizes (see granitemoehybrid below)
        "linear_head_dim": 16,
        "num_key_value_heads": 4,
        "qk_rope_head_dim": 0,
        "qk_nope_head_dim": 16,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    "glm4v_moe_text": {
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [1, 1, 2],
        }
    },
    "gemma4_text": {
        "vocab_size_per_layer_input": 128,
        "hidden_size_per_layer_input": 16,
        "enable_moe_block": True,
        "top_k_experts": 2,
    },
    "diffusion_gemma_text": {"top_k_experts": 2},
    "ernie4_5_vl_moe_text": {  # text and vision experts of different sizes, as in the real model
        "moe_intermediate_size": [32, 16],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
    },
    "zaya": {"num_experts_per_tok": 1},
    # State-space and linear-attention layers at tiny sizes: their defaults (128 heads, a 256-wide state,
    # chunks of 256) make the reference PyTorch scans of the hybrids take minutes on a CPU.
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_state": 16, "mamba_chunk_size": 16},
    "nemotron_h": {"mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "chunk_size": 16},
    "kimi_linear": {"linear_num_heads": 4, "linear_head_dim": 16},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 125},
    # vision mergers sized to the tiny text model (their defaults project to 1536-4096 wide models)
    "glm5_next_vision": {"out_hidden_size": 64, "projection_intermediate_size": 64},
    "glm4v_moe_vision": {"out_hidden_size": 64},
    # its audio tower defaults to 32 layers of width 1280 (2.5 GB in fp32); the text model never calls it here
    "qwen3_omni_moe_audio_encoder": {
        "encoder_layers": 1,
        "d_model": 32,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64,
        "output_dim": 64,
        "downsample_hidden_size": 32,
    },
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


def tiny_config(model_type: str, **overrides: Any) -> transformers.PretrainedConfig:
    return _tiny(CONFIG_MAPPING[model_type], overrides)


def _tiny(config_class: type, overrides: dict[str, Any]) -> transformers.PretrainedConfig:
    overrides = {**ARCH_OVERRIDES.get(getattr(config_class, "model_type", ""), {}), **overrides}
    fields = (
        {f.name for f in dataclasses.fields(config_class)}
        if dataclasses.is_dataclass(config_class)
        else set()
    )
    # Generic sizes only where the class declares them; per-architecture overrides always (some are attributes
    # the modeling code reads without the config class declaring them).
    kwargs = {**{k: v for k, v in SMALL.items() if k in fields}, **overrides}
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    if sub_configs:
        default = config_class()  # configs are cheap; this tells the concrete class of AutoConfig sub-configs
        for name in sub_configs:  # text, vision, audio towers: shrink each
            sub = getattr(default, name, None)
            wanted = overrides.get(name)
            if isinstance(wanted, dict) and "model_type" in wanted:  # a tower the default leaves out
                sub_class = CONFIG_MAPPING[wanted["model_type"]]
            elif isinstance(sub, transformers.PretrainedConfig):
                sub_class = type(sub)
            else:
                continue
            if name in fields:
                kwargs[name] = _tiny(sub_class, {}).to_dict()
    config = config_class(**kwargs)
    types = getattr(config, "layer_types", None)
    if types and set(types) == {"linear_attention"} and "layer_types" in fields:
        # Linear-attention hybrids put full attention every few layers; make one of the three full.
        return _tiny(config_class, {**overrides, "layer_types": [types[0], "full_attention", *types[2:]]})
    return config


# The four architectures of the core runtime, at a size that loads in well under a second.
TINY_ARCHS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=256,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=4,
        max_position_embeddings=256,
        eos_token_id=2,
    ),
}


def save_tiny(
    config: transformers.PretrainedConfig, directory: Path, seed: int = 0, model_class: type | None = None
) -> Path:
    """Random weights (scaled up so routing is decisive and outputs are far from zero), saved in fp32."""
    torch.manual_seed(seed)
    if model_class is None:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = model_class._from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15 if "experts" in name or "gate" in name else 0.08)
    model.save_pretrained(directory)
    return directory
