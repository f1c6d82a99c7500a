"""Random-weight models of a real shape, offloaded, built on the fly and never saved: for benchmarks.

The experts go straight into the host store layer by layer, so a Qwen3-30B-A3B or Mixtral-8x7B shape needs
host RAM for its experts once and never a whole model. Drawing tens of GB of normal samples on the CPU
would take minutes, so each expert is copied from a small bank of random experts: the values of random
weights do not matter for timing, and forced routing (offload.forced) sets the access pattern anyway.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel

from offload.config import OffloadConfig
from offload.hf import attach_runtime, model_class_for, new_runtime, take_over_experts
from offload.survey import expert_param_names

BANK_EXPERTS = 8  # distinct random experts the store is filled from


def random_offloaded(
    hf_config: PretrainedConfig, config: OffloadConfig, seed: int = 0, progress: bool = True
) -> PreTrainedModel:
    """An offloaded model of ``hf_config``'s shape with random weights (dtype: ``config.dtype`` or bf16)."""
    model_class, hf_config = model_class_for(hf_config)
    dtype = config.dtype or torch.bfloat16
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    runtime = new_runtime(model, dtype, config, model_name=f"random {hf_config.model_type}")
    model_survey = runtime.survey
    std = float(getattr(hf_config.get_text_config(), "initializer_range", 0.02) or 0.02)
    generator = torch.Generator().manual_seed(seed)
    names = expert_param_names(model_survey.layout)
    bank: dict[str, torch.Tensor] = {}
    for layer, name in enumerate(tqdm(model_survey.layer_names, desc="Random experts", disable=not progress)):
        module = model.get_submodule(name)
        for p in names:
            shape = getattr(module, p).shape  # [E, ...] on meta
            if p not in bank:
                draw = torch.empty((min(BANK_EXPERTS, shape[0]), *shape[1:]), dtype=torch.float32)
                bank[p] = draw.normal_(0.0, std, generator=generator).to(dtype)
            rows = (torch.arange(shape[0]) + layer) % bank[p].shape[0]  # a different mix per layer
            setattr(module, p, nn.Parameter(bank[p][rows], requires_grad=False))
        take_over_experts(model, runtime, layer, name)
    # Everything else: allocated on the device and initialized as transformers initializes new models.
    model.to_empty(device=config.device)
    torch.manual_seed(seed)
    model.initialize_weights()
    model.eval()
    attach_runtime(model, runtime)
    return model
