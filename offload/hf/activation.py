"""Read an experts module's nonlinearity as an :class:`~offload.kernels.activation.ExpertActivation`."""

from __future__ import annotations

from torch import nn
from transformers import activations as hf_act
from transformers.integrations.moe import _default_apply_gate

from offload.kernels.activation import ExpertActivation, GateTimesUp, ModuleGate

# Activations the Triton kernels fuse, by module class. Anything else runs the module itself.
_NAMED: dict[type[nn.Module], str] = {
    hf_act.SiLUActivation: "silu",
    nn.SiLU: "silu",
    hf_act.GELUTanh: "gelu_tanh",
    hf_act.NewGELUActivation: "gelu_tanh",
    hf_act.GELUActivation: "gelu",
    nn.GELU: "gelu",
    nn.ReLU: "relu",
}


def activation_of(module: nn.Module) -> ExpertActivation:
    """The activation of a transformers experts module (``@use_experts_implementation``)."""
    has_gate = bool(getattr(module, "has_gate", True))
    act_fn = getattr(module, "act_fn", None)
    apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if not has_gate:
        if act_fn is None:
            raise ValueError(f"{type(module).__name__} has no gate and no act_fn")
        return ExpertActivation(_NAMED.get(type(act_fn), "custom"), False, act_fn)
    if apply_gate is _default_apply_gate and act_fn is not None:
        return ExpertActivation(_NAMED.get(type(act_fn), "custom"), True, GateTimesUp(act_fn))
    fn = ModuleGate(module, interleaved=not getattr(module, "is_concatenated", True))
    if _is_gpt_oss_gate(module):
        alpha, limit = float(module.alpha), float(module.limit)  # type: ignore[arg-type]
        return ExpertActivation("gpt_oss", True, fn, alpha=alpha, limit=limit)
    return ExpertActivation("custom", True, fn)


def _is_gpt_oss_gate(module: nn.Module) -> bool:
    return type(module).__name__ == "GptOssExperts" and hasattr(module, "alpha") and hasattr(module, "limit")
