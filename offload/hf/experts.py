"""The module that takes the place of each transformers ``*Experts`` module.

It keeps HF's forward signature ``(hidden_states, top_k_index, top_k_weights)``, so the router, the MoE
block around it and ``generate()`` run unchanged; the weights live in the runtime, not in the module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from offload.runtime.runtime import OffloadRuntime


class OffloadedExperts(nn.Module):
    _runtime: OffloadRuntime

    def __init__(
        self, runtime: OffloadRuntime, layer: int, replaces: nn.Module, placeholders: dict[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_experts = int(replaces.num_experts)  # type: ignore[arg-type]
        self.replaced_class = type(replaces).__name__
        # A plain attribute, not a submodule: the runtime is shared by every layer and holds no parameters.
        object.__setattr__(self, "_runtime", runtime)
        # Loaded by construction (the weights are in the runtime's host store): transformers' weight
        # initialization must skip this module, and a model's _init_weights that reaches for
        # `block.experts.gate_up_proj` finds a weightless placeholder that its init functions skip.
        self._is_hf_initialized = True
        for name, tensor in placeholders.items():
            placeholder = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            placeholder._is_hf_initialized = True  # type: ignore[attr-defined]
            object.__setattr__(self, name, placeholder)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:
        return self._runtime.forward_layer(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, replaces={self.replaced_class}"
