"""How good a predictor's guesses are, per layer: each guess for a layer is scored against the experts that
layer's next access uses.

``recall`` is the share of the experts accesses needed that a guess had named; ``precision`` the share of the
named experts that the access then needed. Scored before the cache filters a guess (experts already resident
are not copied again, but they were guessed right all the same), so the numbers judge the predictor, not the
cache. Accesses no guess was made for (the first layer under lookahead, the first accesses under history, whose
guesses are empty until it has seen the layer) are counted in ``accesses`` and left out of both ratios: ``coverage`` says how many were scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class GuessScore:
    def __init__(self, num_layers: int) -> None:
        self._pending: dict[int, frozenset[int]] = {}
        self.accesses = [0] * num_layers  # layer accesses seen
        self.scored = [0] * num_layers  # of which a guess had been made for
        self.needed = [0] * num_layers  # experts the scored accesses used
        self.guessed = [0] * num_layers  # experts the guesses for them named
        self.correct = [0] * num_layers  # named and used

    def guess(self, layer: int, experts: Sequence[int]) -> None:
        """A guess for ``layer``'s next access; a later guess for the same access replaces it."""
        self._pending[layer] = frozenset(experts)

    def access(self, layer: int, experts: Sequence[int]) -> None:
        """``layer`` used ``experts``: score the guess made for it, if any."""
        self.accesses[layer] += 1
        guessed = self._pending.pop(layer, None)
        if guessed is None:
            return
        self.scored[layer] += 1
        self.needed[layer] += len(experts)
        self.guessed[layer] += len(guessed)
        self.correct[layer] += sum(1 for e in experts if e in guessed)

    def recall(self, layer: int | None = None) -> float | None:
        needed = sum(self.needed) if layer is None else self.needed[layer]
        correct = sum(self.correct) if layer is None else self.correct[layer]
        return correct / needed if needed else None

    def precision(self, layer: int | None = None) -> float | None:
        guessed = sum(self.guessed) if layer is None else self.guessed[layer]
        correct = sum(self.correct) if layer is None else self.correct[layer]
        return correct / guessed if guessed else None

    def coverage(self, layer: int | None = None) -> float | None:
        accesses = sum(self.accesses) if layer is None else self.accesses[layer]
        scored = sum(self.scored) if layer is None else self.scored[layer]
        return scored / accesses if accesses else None

    def as_dict(self) -> dict[str, Any]:
        """Overall and per-layer ratios and the counts behind them."""
        layers = range(len(self.accesses))
        return {
            "recall": self.recall(),
            "precision": self.precision(),
            "coverage": self.coverage(),
            "per_layer": [
                {
                    "layer": layer,
                    "recall": self.recall(layer),
                    "precision": self.precision(layer),
                    "accesses": self.accesses[layer],
                    "scored": self.scored[layer],
                    "needed": self.needed[layer],
                    "guessed": self.guessed[layer],
                    "correct": self.correct[layer],
                }
                for layer in layers
            ],
        }
