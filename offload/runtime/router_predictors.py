"""Predictors that run a model's own routers on hidden states (torch); the routing-only ones live in
:mod:`cache_policies.predictors`. Both plug into the prefetch protocol (:mod:`cache_policies.prefetch`).

Lookahead: as in the mixtral-offloading paper, layer l+1's own router is applied to the hidden state that
layer l's experts receive; the residual stream changes little between neighbouring layers, so its top-k is a
good guess.

Pre-attention: layer l's own router applied to the residual stream entering decoder layer l, before its
attention, so the copies overlap that attention. The router normally sees ``norm(x + attention(x))``, with
``norm`` the decoder layer's norm in front of the MoE block (``post_attention_layernorm`` in Mixtral and
Qwen3-MoE); the guess uses ``norm(x)``: the same norm and router, only the attention's update is missing.
(Measured against ``input_layernorm(x)`` and the raw ``x`` in docs/prediction.md.) The guess costs one more
device-to-host read per layer call: its ids are needed before the layer runs, when there is nothing to ride
along with.

A guess only steers prefetch copies: a wrong one costs bandwidth, never correctness.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cache_policies import Guess
from offload.errors import UnsupportedModelError


def expert_ids_in(router_output: Any) -> torch.Tensor | None:
    """The integer expert ids ``[T, k]`` among what a router's ``forward`` returned, or None without any."""
    outputs = router_output if isinstance(router_output, tuple) else (router_output,)
    return next(
        (t for t in outputs if torch.is_tensor(t) and not t.is_floating_point() and t.dim() == 2), None
    )


class RouterPredictor:
    """A predictor in two halves, so that it adds no device-to-host read of its own: ``router_ids`` runs on
    the device before the layer's routing is read to the host, its ids ride along in that one read
    (:meth:`offload.kernels.RoutedTokens.build`), and ``guess`` gets their host copy as ``hint``."""

    name = "router"

    def __init__(self, routers: list[nn.Module], num_experts: int) -> None:
        self.routers = routers  # one per MoE layer, found by offload.hf.prefetch.moe_routers
        self.num_experts = num_experts

    def observe(self, layer: int, experts: Any) -> None:
        pass  # it predicts from the hidden state alone

    def target(self, layer: int) -> int | None:
        """The layer it guesses for while ``layer`` runs; None for none."""
        raise NotImplementedError

    def router_ids(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Expert ids ``[T, k]`` the target layer's router chooses for ``hidden_states`` ``[T, H]`` (the state
        entering ``layer``'s experts); None when there is no target. Calls ``forward`` directly so no module hook
        (e.g. router-logit recorders) sees it."""
        target = self.target(layer)
        return None if target is None else self._ids(target, hidden_states)

    def _ids(self, target: int, hidden_states: torch.Tensor) -> torch.Tensor:
        ids = expert_ids_in(self.routers[target].forward(hidden_states))
        if ids is None:
            raise UnsupportedModelError(
                f"{self.name} prefetch: the router of MoE layer {target} ({type(self.routers[target]).__name__}) "
                "does not return expert ids; use prefetch='history'"
            )
        return ids

    def guess(self, layer: int, count: int, hint: Any) -> Guess | None:
        """The target layer's experts from ``hint``, the host copy of :meth:`router_ids`' ids. ``count`` is
        unused: the router picks its own top-k per token."""
        target = self.target(layer)
        if target is None or hint is None:
            return None
        ids = np.asarray(hint)
        return Guess(target, np.unique(ids[(ids >= 0) & (ids < self.num_experts)]).tolist())


class LookaheadPredictor(RouterPredictor):
    name = "lookahead"

    def target(self, layer: int) -> int | None:
        return layer + 1 if layer + 1 < len(self.routers) else None


class PreAttentionPredictor(RouterPredictor):
    """Guesses layer l's experts before decoder layer l runs: ``norms[l]`` (the norm in front of the MoE
    block) and layer l's router applied to the layer's input. Nothing rides along with a layer's routing."""

    name = "pre-attention"

    def __init__(self, routers: list[nn.Module], norms: list[nn.Module], num_experts: int) -> None:
        super().__init__(routers, num_experts)
        self.norms = norms  # one per MoE layer, found by offload.hf.prefetch.pre_moe_norm

    def target(self, layer: int) -> int | None:
        return None

    def early_ids(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Expert ids ``[T, k]`` layer ``layer``'s router picks for ``hidden_states`` ``[T, H]``, the residual
        stream entering the decoder layer, through the norm in front of its MoE block. Calls ``forward``
        directly so no module hook sees it."""
        return self._ids(layer, self.norms[layer].forward(hidden_states))

    def guess(self, layer: int, count: int, hint: Any) -> Guess | None:
        """``layer``'s own experts from ``hint``, the host copy of :meth:`early_ids`; None without one (after
        an access, when the step has no early ids to give)."""
        if hint is None:
            return None
        ids = np.asarray(hint)
        return Guess(layer, np.unique(ids[(ids >= 0) & (ids < self.num_experts)]).tolist())
