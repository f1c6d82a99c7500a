"""The lookahead predictor: which experts layer l+1 will need, from the hidden state entering layer l's MoE.

As in the mixtral-offloading paper, layer l+1's own router is applied to the hidden state that layer l's
experts receive; the residual stream changes little between neighbouring layers, so its top-k is a good
guess. The guess only steers prefetch copies: a wrong one costs bandwidth, never correctness.
"""

from __future__ import annotations

import torch
from torch import nn

from offload.errors import UnsupportedModelError

# Where transformers' MoE blocks keep their router, next to the experts module.
_ROUTER_NAMES = ("gate", "router")


class LookaheadPredictor:
    name = "lookahead"

    def __init__(self, routers: list[nn.Module]) -> None:
        self.routers = routers  # one per MoE layer

    @classmethod
    def from_model(cls, model: nn.Module, layer_names: tuple[str, ...]) -> LookaheadPredictor:
        routers = []
        for name in layer_names:
            block = model.get_submodule(name.rpartition(".")[0])
            router = next(
                (getattr(block, n) for n in _ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)),
                None,
            )
            if router is None:
                raise UnsupportedModelError(
                    f"lookahead prefetch needs each MoE block's router; {type(block).__name__} has none named "
                    f"{' or '.join(_ROUTER_NAMES)}: use prefetch='history'"
                )
            routers.append(router)
        return cls(routers)

    def predict(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor | None:
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
