"""Random-weight models of a real shape, built on the fly and never saved: for benchmarks.

Offloaded (:func:`random_offloaded`): the experts go straight into the host store layer by layer, so a
Qwen3-30B-A3B or Mixtral-8x7B shape needs host RAM for its experts once and never a whole model. Plain
(:func:`random_plain`): the whole model in host RAM, for the peers' baselines. Drawing tens of GB of normal
samples on the CPU would take minutes, so each expert is copied from a small bank of random experts
(:class:`ExpertBank`): the values of random weights do not matter for timing, and forced routing
(:mod:`offload_bench.forced_routing`) sets the access pattern.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from offload.config import OffloadConfig
from offload.hf.install import attach_runtime, new_runtime, take_over_experts
from offload.hf.skeleton import model_class_for
from offload.hf.survey import expert_param_names, experts_modules, survey
from offload.runtime.model_survey import ModelSurvey

BANK_EXPERTS = 8  # distinct random experts the weights are filled from


class ExpertBank:
    """``BANK_EXPERTS`` random experts per parameter name, drawn once; layer ``l`` gets a different mix."""

    def __init__(self, std: float, dtype: torch.dtype, seed: int) -> None:
        self.std = std
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self._bank: dict[str, torch.Tensor] = {}

    def experts(self, name: str, shape: torch.Size, layer: int) -> torch.Tensor:
        """``[E, ...]`` weights for parameter ``name`` of MoE layer ``layer``, copied from the bank."""
        if name not in self._bank:
            draw = torch.empty((min(BANK_EXPERTS, shape[0]), *shape[1:]), dtype=torch.float32)
            self._bank[name] = draw.normal_(0.0, self.std, generator=self.generator).to(self.dtype)
        bank = self._bank[name]
        return bank[(torch.arange(shape[0]) + layer) % bank.shape[0]]


def _std(hf_config: PretrainedConfig) -> float:
    return float(getattr(hf_config.get_text_config(), "initializer_range", 0.02) or 0.02)


def random_offloaded(
    hf_config: PretrainedConfig, config: OffloadConfig, seed: int = 0, progress: bool = True
) -> PreTrainedModel:
    """An offloaded model of ``hf_config``'s shape with random weights (dtype: ``config.dtype`` or bf16)."""
    model_class, hf_config = model_class_for(hf_config)
    dtype = config.dtype or torch.bfloat16
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    runtime = new_runtime(model, dtype, config, model_name=f"random {hf_config.model_type}")
    bank = ExpertBank(_std(hf_config), dtype, seed)
    names = runtime.survey.layer_names
    for layer, name in enumerate(tqdm(names, desc="Random experts", disable=not progress)):
        module = model.get_submodule(name)
        for p in expert_param_names(runtime.survey.layout):
            shape = getattr(module, p).shape  # [E, ...] on meta
            setattr(module, p, nn.Parameter(bank.experts(p, shape, layer), requires_grad=False))
        take_over_experts(model, runtime, layer, name)
    # Everything else: allocated on the device and initialized as transformers initializes new models.
    model.to_empty(device=config.device)
    torch.manual_seed(seed)
    model.initialize_weights()
    model.eval()
    attach_runtime(model, runtime)
    return model


def random_plain(hf_config: PretrainedConfig, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """A plain transformers model in host RAM with random weights, filled as :func:`random_offloaded` fills its
    store, everything else initialized as transformers initializes new models."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.to_empty(device="cpu")
    model.requires_grad_(False)
    bank = ExpertBank(_std(hf_config), dtype, seed)
    for layer, (_, module) in enumerate(experts_modules(model)):
        for name, param in module.named_parameters(recurse=False):
            param.copy_(bank.experts(name, param.shape, layer))
            param._is_hf_initialized = True  # type: ignore[attr-defined]  # initialize_weights skips it
    del bank
    torch.manual_seed(seed)
    model.initialize_weights()
    return model.eval()


def shape_survey(hf_config: PretrainedConfig, dtype: torch.dtype) -> ModelSurvey:
    """The runtime's view of a config (MoE layers, expert bytes, resident bytes), from a meta-device model."""
    model_class, hf_config = model_class_for(hf_config)
    with torch.device("meta"):
        model = model_class._from_config(hf_config, dtype=dtype)
    return survey(model, dtype)
