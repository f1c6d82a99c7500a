"""Predictors that name the experts a layer will need next, from routing alone (pure Python).

The runtime and the simulator share them, so a recorded run replays with the same prefetches
(:mod:`cache_policies.prefetch`). The predictors that need hidden states and a model's routers live in the
runtime (:mod:`offload.runtime.router_predictors`).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

from cache_policies.prefetch import Guess


class HistoryPredictor:
    """Experts a layer used most over its last ``window`` accesses (activation history, MoE-Infinity style).

    ``predict(layer, count)`` returns up to ``count`` experts, ascending: the most used in the window, ties
    going to the most recent use, then to the lower id.
    """

    name = "history"

    def __init__(self, num_layers: int, window: int = 8) -> None:
        if window < 1:
            raise ValueError(f"history window must be at least 1 access, got {window}")
        self.num_layers = num_layers
        self.window = window
        self._recent: list[deque[tuple[int, ...]]] = [deque(maxlen=window) for _ in range(num_layers)]

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        self._recent[layer].append(tuple(experts))

    def predict(self, layer: int, count: int) -> list[int]:
        recent = self._recent[layer]
        if not recent or count < 1:
            return []
        uses: Counter[int] = Counter()
        last: dict[int, int] = {}
        for age, experts in enumerate(recent):
            uses.update(experts)
            for expert in experts:
                last[expert] = age
        ranked = sorted(uses, key=lambda e: (-uses[e], -last[e], e))
        return sorted(ranked[:count])

    def guess(self, layer: int, count: int, hint: Any = None) -> Guess:
        """The next MoE layer's ``count`` most used experts; after the last layer, the next token's first."""
        target = next_layer(layer, self.num_layers, wrap=True)
        assert target is not None  # wrap=True always names a layer
        return Guess(target, self.predict(target, count))


PREFETCH_MODES = ("none", "history", "lookahead", "pre-attention")
# What the runtime takes: "auto" picks one of the modes per model (offload.hf.prefetch).
PREFETCH_CHOICES = ("auto", *PREFETCH_MODES)


def next_layer(layer: int, num_layers: int, wrap: bool) -> int | None:
    """The MoE layer after ``layer``; after the last, the first (the next token's) when ``wrap``."""
    if layer + 1 < num_layers:
        return layer + 1
    return 0 if wrap else None
