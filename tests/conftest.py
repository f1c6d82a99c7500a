"""Shared fixtures: tiny MoE checkpoints built in code and saved with save_pretrained (nothing downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on before triton
    # is first imported (importing torch does not import it; transformers and offload may).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

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


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tests write the user cache (compressed stores, machine probes) to a folder of their own, never the
    user's; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("user-cache")
    previous = os.environ.get("MOE_OFFLOAD_CACHE")
    os.environ["MOE_OFFLOAD_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MOE_OFFLOAD_CACHE", None)
    else:
        os.environ["MOE_OFFLOAD_CACHE"] = previous


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: save_tiny(make(), root / arch) for arch, make in TINY_ARCHS.items()}


@pytest.fixture(scope="session")
def mixtral_checkpoint(tiny_checkpoints: dict[str, Path]) -> Path:
    return tiny_checkpoints["mixtral"]


def reference_model(path: Path, device: str = "cpu") -> transformers.PreTrainedModel:
    """The unmodified transformers model, fp32."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
