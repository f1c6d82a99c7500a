"""The expert's nonlinearity, taken from the HF experts module and expressed on the canonical layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import activations as hf_act
from transformers.integrations.moe import _default_apply_gate

# Activations the Triton kernels fuse, by HF module class. Anything else runs the HF module itself.
_NAMED: dict[type[nn.Module], str] = {
    hf_act.SiLUActivation: "silu",
    nn.SiLU: "silu",
    hf_act.GELUTanh: "gelu_tanh",
    hf_act.NewGELUActivation: "gelu_tanh",
    hf_act.GELUActivation: "gelu",
    nn.GELU: "gelu",
    nn.ReLU: "relu",
}


@dataclass(frozen=True)
class ExpertActivation:
    """``fn`` maps the canonical ``gate_up`` output ``[n, G*I]`` to ``[n, I]``.

    ``kind`` names the math when a fused kernel can do it (``silu``, ``gelu_tanh``, ``gelu``, ``relu``,
    ``gpt_oss``), and is ``custom`` when only the HF code knows it.
    """

    kind: str
    has_gate: bool
    fn: Callable[[torch.Tensor], torch.Tensor]
    alpha: float = 0.0  # gpt_oss only
    limit: float = 0.0  # gpt_oss only

    @classmethod
    def from_hf(cls, module: nn.Module) -> ExpertActivation:
        has_gate = bool(getattr(module, "has_gate", True))
        act_fn = getattr(module, "act_fn", None)
        apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
        if not has_gate:
            if act_fn is None:
                raise ValueError(f"{type(module).__name__} has no gate and no act_fn")
            return cls(_NAMED.get(type(act_fn), "custom"), False, act_fn)
        if apply_gate is _default_apply_gate and act_fn is not None:
            return cls(_NAMED.get(type(act_fn), "custom"), True, _GateTimesUp(act_fn))
        # A custom gate written for the checkpoint's own column order: hand it that order back.
        interleaved = not getattr(module, "is_concatenated", True)
        fn = _HFGate(module, interleaved)
        if _is_gpt_oss_gate(module):
            alpha, limit = float(module.alpha), float(module.limit)  # type: ignore[arg-type]
            return cls("gpt_oss", True, fn, alpha=alpha, limit=limit)
        return cls("custom", True, fn)


class _GateTimesUp:
    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.act_fn = act_fn

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class _HFGate:
    def __init__(self, module: nn.Module, interleaved: bool) -> None:
        self.module = module
        self.interleaved = interleaved

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            gate, up = gate_up.chunk(2, dim=-1)
            gate_up = torch.stack((gate, up), dim=-1).flatten(-2)
        return self.module._apply_gate(gate_up)  # type: ignore[operator]


def _is_gpt_oss_gate(module: nn.Module) -> bool:
    return (
        type(module).__name__ in {"GptOssExperts"} and hasattr(module, "alpha") and hasattr(module, "limit")
    )
