"""Predictors that run a model's own routers on hidden states (torch); the routing-only ones live in
:mod:`cache_policies.predictors`. Both plug into the prefetch protocol (:mod:`cache_policies.prefetch`).

Lookahead: as in the mixtral-offloading paper, layer l+1's own router is applied to the hidden state that
layer l's experts receive; the residual stream changes little between neighbouring layers, so its top-k is a
good guess. A guess only steers prefetch copies: a wrong one costs bandwidth, never correctness.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cache_policies import Guess
from offload.errors import UnsupportedModelError


class LookaheadPredictor:
    name = "lookahead"

    def __init__(self, routers: list[nn.Module], num_experts: int) -> None:
        self.routers = routers  # one per MoE layer, found by offload.hf.install.moe_routers
        self.num_experts = num_experts

    def observe(self, layer: int, experts: Any) -> None:
        pass  # it predicts from the hidden state alone

    def guess(self, layer: int, count: int, hint: Any) -> Guess | None:
        """Layer ``layer + 1``'s experts for ``hint`` (the hidden state ``[T, H]`` entering ``layer``'s experts);
        None after the last layer. ``count`` is unused: the router picks its own top-k per token."""
        ids = self.router_ids(layer, hint)
        if ids is None:
            return None
        return Guess(layer + 1, [e for e in torch.unique(ids).tolist() if 0 <= e < self.num_experts])

    def router_ids(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Expert ids ``[T, k]`` layer ``layer + 1`` would choose for ``hidden_states`` ``[T, H]``; None after the
        last layer. Calls ``forward`` directly so no module hook (e.g. router-logit recorders) sees it."""
        if layer + 1 >= len(self.routers):
            return None
        out = self.routers[layer + 1].forward(hidden_states)
        outputs = out if isinstance(out, tuple) else (out,)
        ids = [t for t in outputs if torch.is_tensor(t) and not t.is_floating_point() and t.dim() == 2]
        if not ids:
            raise UnsupportedModelError(
                f"lookahead prefetch: the router of MoE layer {layer + 1} ({type(self.routers[layer + 1]).__name__}) "
                "does not return expert ids; use prefetch='history'"
            )
        return ids[0]
