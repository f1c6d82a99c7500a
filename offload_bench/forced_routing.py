"""Forced routing: replace the routers' expert choices with a recorded routing trace.

Random weights route unlike trained ones (near-uniform, nearly the same experts every token), so a
benchmark on a random-weight model of a real shape would measure the wrong access pattern. Forcing the
choices from a trace recorded on the trained model gives real access patterns on synthetic weights. The
routing weights stay the model's own; only which experts run changes, so outputs are not meaningful.

Install with ``offload.override_routing(model, ForcedRouting(trace, ...))``.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_policies import RoutingTrace


class ForcedRouting:
    """A routing override that hands out the trace's tokens in order, one per routed token, cycling at the
    end."""

    def __init__(self, trace: RoutingTrace, num_layers: int, num_experts: int, top_k: int) -> None:
        if (trace.num_layers, trace.top_k) != (num_layers, top_k) or trace.num_experts > num_experts:
            raise ValueError(
                f"trace has {trace.num_layers} layers x top-{trace.top_k} over {trace.num_experts} experts; the model "
                f"has {num_layers} MoE layers x top-{top_k} over {num_experts}"
            )
        self._ids = torch.from_numpy(np.ascontiguousarray(trace.ids, dtype=np.int64))  # [tokens, layers, k]
        self._next = 0  # first trace token of the current forward

    def __call__(
        self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids(layer, top_k_index.shape[0], top_k_index.device), top_k_weights

    def ids(self, layer: int, tokens: int, device: torch.device) -> torch.Tensor:
        """Expert ids ``[tokens, k]`` for MoE layer ``layer`` of the current forward."""
        total = self._ids.shape[0]
        rows = (torch.arange(tokens) + self._next) % total
        out = self._ids[rows, layer].to(device)
        if layer == self._ids.shape[1] - 1:  # the forward's last MoE layer: move on
            self._next = (self._next + tokens) % total
        return out
