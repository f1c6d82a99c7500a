"""Installing the runtime into a transformers model: the experts modules swapped, the handle attached.

``new_runtime`` opens every model builder (survey, budget, runtime; no weight moves yet), ``take_over_experts``
swaps one experts module for :class:`OffloadedExperts` once its weights are in the host store, and
``attach_runtime`` closes it (the router predictors, which need the model's modules, and the handle that
``offload.stats`` and friends find the runtime by).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from offload.config import OffloadConfig
from offload.errors import CheckpointError, OffloadError, UnsupportedModelError
from offload.hf.activation import activation_of
from offload.hf.expert_formats import with_format
from offload.hf.experts import OffloadedExperts
from offload.hf.survey import expert_param_names, survey
from offload.runtime.budget import plan_budget
from offload.runtime.host_plan import check_host_memory
from offload.runtime.router_predictors import LookaheadPredictor, PreAttentionPredictor
from offload.runtime.runtime import OffloadRuntime

RUNTIME_ATTR = "_offload_runtime"
# Where transformers' MoE blocks keep their router, next to the experts module.
ROUTER_NAMES = ("gate", "router")
# The decoder layer's norm in front of its MoE block: Gemma-style layers name it pre_feedforward_layernorm (their
# post_attention_layernorm normalizes the attention's output before the residual add); most others
# post_attention_layernorm.
PRE_MOE_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm")


def new_runtime(
    model: PreTrainedModel, dtype: torch.dtype, config: OffloadConfig, model_name: str, reading: bool = False
) -> OffloadRuntime:
    """Survey ``model`` (meta or loaded), check the budget, and allocate its runtime; no weight moves yet.
    The experts' storage format is part of the survey: slots are counted in it. ``reading``: the weights are
    still to be read from the checkpoint (a quantized one's experts can then be kept in its format), so host
    RAM is checked too before any is."""
    model_survey = with_format(survey(model, dtype), config, model.config if reading else None)
    budget = plan_budget(model_survey, config)
    if reading:
        check_host_memory(model_survey, config, budget.planned_bytes)
    return OffloadRuntime(config, model_survey, budget, model_name=model_name)


def take_over_experts(
    model: nn.Module,
    runtime: OffloadRuntime,
    layer: int,
    name: str,
    packed: dict[str, torch.Tensor] | None = None,
) -> None:
    """Pack the experts module ``name`` into the host store, free its weights, and put ours in its place.
    ``packed``: the layer's fields already in the layout's format (a native MXFP4/FP8 checkpoint's experts,
    read by the loader; the module then holds only its biases)."""
    module = model.get_submodule(name)
    param_names = expert_param_names(runtime.survey.layout)
    weights = {p: getattr(module, p) for p in param_names}
    if packed is None:
        unloaded = [p for p, t in weights.items() if t is None or t.is_meta]
        if unloaded:
            raise CheckpointError(f"the checkpoint has no {unloaded[0]} for {name}")
        runtime.attach_layer(layer, {p: t.detach() for p, t in weights.items()}, activation_of(module))
    else:
        runtime.attach_packed_layer(layer, packed, activation_of(module))
    # The host store has the bytes now. A custom gate may keep the module alive, but not its weights.
    for p in param_names:
        setattr(module, p, None)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, OffloadedExperts(runtime, layer, module, placeholders=weights))


def attach_runtime(model: nn.Module, runtime: OffloadRuntime) -> None:
    """The last step of every builder: the router predictors (they need the model's routers; pre-attention
    also its norms and a hook on each decoder layer) and the handle that offload.stats and friends find the
    runtime by."""
    names, num_experts = runtime.survey.layer_names, runtime.survey.num_experts
    if runtime.config.prefetch == "lookahead":
        runtime.use_predictor(LookaheadPredictor(moe_routers(model, names), num_experts))
    elif runtime.config.prefetch == "pre-attention":
        decoder_layers = [model.get_submodule(_decoder_layer_name(name)) for name in names]
        norms = [_pre_moe_norm(layer, name) for layer, name in zip(decoder_layers, names, strict=True)]
        runtime.use_predictor(PreAttentionPredictor(moe_routers(model, names), norms, num_experts))
        for index, decoder_layer in enumerate(decoder_layers):
            decoder_layer.register_forward_pre_hook(_before_layer_hook(runtime, index), with_kwargs=True)
    setattr(model, RUNTIME_ATTR, runtime)


def _decoder_layer_name(experts_name: str) -> str:
    """``model.layers.3.mlp.experts`` -> ``model.layers.3``: the decoder layer around the MoE block."""
    return experts_name.rpartition(".")[0].rpartition(".")[0]


def _pre_moe_norm(decoder_layer: nn.Module, experts_name: str) -> nn.Module:
    for name in PRE_MOE_NORM_NAMES:
        norm = getattr(decoder_layer, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise UnsupportedModelError(
        f"pre-attention prefetch needs the norm in front of each MoE block; {type(decoder_layer).__name__} "
        f"(around {experts_name}) has none named {', '.join(PRE_MOE_NORM_NAMES)}: use prefetch='lookahead'"
    )


def _before_layer_hook(runtime: OffloadRuntime, layer: int) -> Callable[[nn.Module, tuple, dict], None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, H]: the residual stream entering
        runtime.before_layer(layer, hidden)

    return hook


def runtime_of(model: nn.Module) -> OffloadRuntime:
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        raise OffloadError(
            "this model is not offloaded: build it with offload.from_pretrained or offload.wrap"
        )
    return runtime


def moe_routers(model: nn.Module, layer_names: tuple[str, ...]) -> list[nn.Module]:
    """The router beside each experts module (``block.gate`` or ``block.router``), in layer order."""
    routers = []
    for name in layer_names:
        block = model.get_submodule(name.rpartition(".")[0])
        router = next(
            (getattr(block, n) for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
        )
        if router is None:
            raise UnsupportedModelError(
                f"lookahead prefetch needs each MoE block's router; {type(block).__name__} has none named "
                f"{' or '.join(ROUTER_NAMES)}: use prefetch='history'"
            )
        routers.append(router)
    return routers
