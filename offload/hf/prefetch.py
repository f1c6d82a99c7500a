"""Which prefetch a transformers model gets, and the hooks its router predictors need.

``prefetch="auto"`` (the default) picks, per model, the predictor measured to help (docs/prediction.md):
``pre-attention`` where each decoder layer has the norm in front of its MoE block and a router that returns
expert ids, else ``lookahead`` where only the routers qualify, else ``none``; and ``none`` whenever the budget
holds every expert or ``host_compute="always"`` (nothing is ever copied on demand, and a guess would cost a
device-to-host read per layer for nothing). ``history`` is never picked: it moved the most bytes and saved the fewest misses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from offload.config import OffloadConfig, PrefetchChoice
from offload.errors import UnsupportedModelError
from offload.runtime.budget import BudgetPlan
from offload.runtime.model_survey import ModelSurvey
from offload.runtime.router_predictors import LookaheadPredictor, PreAttentionPredictor, expert_ids_in
from offload.runtime.runtime import OffloadRuntime

# Where transformers' MoE blocks keep their router, next to the experts module.
ROUTER_NAMES = ("gate", "router")
# The decoder layer's norm in front of its MoE block: Gemma-style layers name it pre_feedforward_layernorm (their
# post_attention_layernorm normalizes the attention's output before the residual add); most others
# post_attention_layernorm.
PRE_MOE_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm")


def resolve_prefetch(
    model: nn.Module, model_survey: ModelSurvey, budget: BudgetPlan, config: OffloadConfig
) -> PrefetchChoice:
    """The prefetch mode the runtime runs for ``model`` (meta or loaded) at ``budget``: ``auto`` resolved (see
    the module doc), a router predictor named explicitly checked against the model, so that a model it cannot
    serve fails with one line before any weight is read."""
    if config.prefetch != "auto":
        return _checked(model, model_survey, config.prefetch)
    if budget.slots >= model_survey.total_experts or config.host_compute == "always":  # nothing will be
        return "none"  # missing, or every miss is computed on the host: no copy to start early
    candidates: tuple[PrefetchChoice, ...] = ("pre-attention", "lookahead")
    for mode in candidates:
        try:
            return _checked(model, model_survey, mode)
        except UnsupportedModelError:
            continue
    return "none"


def _checked(model: nn.Module, model_survey: ModelSurvey, mode: PrefetchChoice) -> PrefetchChoice:
    """``mode``, once the model is found to have what its predictor needs; UnsupportedModelError if not."""
    if mode not in ("lookahead", "pre-attention"):
        return mode  # history and none read only the routing
    names = model_survey.layer_names
    router = moe_routers(model, names)[0]
    if not _returns_expert_ids(router, model_survey.layout.hidden_size):
        raise UnsupportedModelError(
            f"{mode} prefetch runs each MoE block's router on a hidden state alone; {type(router).__name__} "
            "needs more than that or returns no expert ids: use prefetch='history'"
        )
    if mode == "pre-attention":
        for name in names:
            pre_moe_norm(model, name)
    return mode


def install_predictor(model: nn.Module, runtime: OffloadRuntime) -> None:
    """Give ``runtime`` the router predictor its (resolved) prefetch mode names, hooked into ``model``."""
    names, num_experts = runtime.survey.layer_names, runtime.survey.num_experts
    if runtime.config.prefetch == "lookahead":
        runtime.use_predictor(LookaheadPredictor(moe_routers(model, names), num_experts))
    elif runtime.config.prefetch == "pre-attention":
        norms = [pre_moe_norm(model, name) for name in names]
        runtime.use_predictor(PreAttentionPredictor(moe_routers(model, names), norms, num_experts))
        for index, name in enumerate(names):
            decoder_layer = model.get_submodule(_decoder_layer_name(name))
            decoder_layer.register_forward_pre_hook(_before_layer_hook(runtime, index), with_kwargs=True)


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


def pre_moe_norm(model: nn.Module, experts_name: str) -> nn.Module:
    """The norm in front of the MoE block whose experts module is ``experts_name``."""
    decoder_layer = model.get_submodule(_decoder_layer_name(experts_name))
    for name in PRE_MOE_NORM_NAMES:
        norm = getattr(decoder_layer, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise UnsupportedModelError(
        f"pre-attention prefetch needs the norm in front of each MoE block; {type(decoder_layer).__name__} "
        f"(around {experts_name}) has none named {', '.join(PRE_MOE_NORM_NAMES)}: use prefetch='lookahead'"
    )


def _returns_expert_ids(router: nn.Module, hidden_size: int) -> bool:
    """Whether ``router`` returns integer expert ids ``[T, k]`` (the router predictors read them), tried on one
    token of zeros where its weights are: on the meta device while a checkpoint is still unread, which costs no
    arithmetic. A router that cannot run on such an input counts as not returning ids."""
    param = next(router.parameters(), None)
    device = param.device if param is not None else torch.device("meta")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with torch.no_grad():
            out = router.forward(torch.zeros(1, hidden_size, device=device, dtype=dtype))
    except Exception:  # any failure means the predictors could not use it either
        return False
    return expert_ids_in(out) is not None


def _decoder_layer_name(experts_name: str) -> str:
    """``model.layers.3.mlp.experts`` -> ``model.layers.3``: the decoder layer around the MoE block."""
    return experts_name.rpartition(".")[0].rpartition(".")[0]


def _before_layer_hook(runtime: OffloadRuntime, layer: int) -> Callable[[nn.Module, tuple, dict], None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, H]: the residual stream entering
        runtime.before_layer(layer, hidden)

    return hook
