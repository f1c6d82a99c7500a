"""The expert's nonlinearity on the canonical layout: what a kernel applies between its two projections.

Built from a transformers experts module by :func:`offload.hf.activation.activation_of`; this module knows
no transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertActivation:
    """``fn`` maps the canonical ``gate_up`` output ``[n, G*I]`` to ``[n, I]``.

    ``kind`` names the math when a fused kernel can do it (``silu``, ``gelu_tanh``, ``gelu``, ``relu``,
    ``gpt_oss``), and is ``custom`` when only the model's own code knows it (kernels then run ``fn``).
    """

    kind: str
    has_gate: bool
    fn: Callable[[torch.Tensor], torch.Tensor]
    alpha: float = 0.0  # gpt_oss only
    limit: float = 0.0  # gpt_oss only


class GateTimesUp:
    """``act(gate) * up`` over the canonical ``[gate rows; up rows]`` order."""

    def __init__(self, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.act_fn = act_fn

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


class ModuleGate:
    """A model's own ``_apply_gate``, written for the checkpoint's column order: hand it that order back."""

    def __init__(self, module: nn.Module, interleaved: bool) -> None:
        self.module = module
        self.interleaved = interleaved

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            gate, up = gate_up.chunk(2, dim=-1)
            gate_up = torch.stack((gate, up), dim=-1).flatten(-2)
        return self.module._apply_gate(gate_up)  # type: ignore[operator]
