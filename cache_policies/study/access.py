"""A trace as the cache sees it: one *layer access* per step and layer, with the step's distinct experts.

The runtime calls :meth:`ExpertCache.access` once per MoE layer per forward call, with the ascending distinct
experts that the call's tokens chose (``offload.kernels.RoutedTokens.experts``). Replaying a trace means
making exactly those calls in exactly that order: step by step, layer 0 to layer L-1. Access number ``t``
is therefore ``step * layers + layer``, and it is also the policy clock (``begin_access(now=t)``) that
Belady's future and LFRU's decay are measured in.

"Expert accesses" (the simulator's accesses, hits and misses) count distinct experts per layer access. For a
decode trace (one token per step) that equals the number of token-expert uses; for prefill steps it is less.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cache_policies.study.trace import RoutingTrace


@dataclass(frozen=True, eq=False)
class AccessSequence:
    num_layers: int
    num_experts: int
    top_k: int
    layers: list[int]  # [accesses]: the layer of each access
    experts: list[list[int]]  # [accesses][distinct]: ascending expert ids of each access
    tokens_per_step: list[int]  # [steps]
    # [accesses][distinct]: tokens routed to each expert of each access; None: one each (a decode trace)
    counts: list[list[int]] | None = None

    def tokens_of(self, access: int) -> list[int]:
        """Tokens routed to each expert of access ``access`` (the copy-or-compute rule weighs them)."""
        return [1] * len(self.experts[access]) if self.counts is None else self.counts[access]

    @property
    def num_accesses(self) -> int:
        """Layer accesses (steps x layers)."""
        return len(self.layers)

    @property
    def expert_accesses(self) -> int:
        """Distinct experts summed over all layer accesses: the simulator's hits + misses."""
        return sum(map(len, self.experts))

    @cached_property
    def keys(self) -> list[list[int]]:
        """Cache keys ``layer * experts + expert`` of each access."""
        E = self.num_experts
        return [[layer * E + e for e in ex] for layer, ex in zip(self.layers, self.experts, strict=True)]

    @cached_property
    def future(self) -> dict[int, list[int]]:
        """Belady's future: see :func:`future_uses`."""
        return future_uses(self)

    @classmethod
    def from_trace(cls, trace: RoutingTrace) -> AccessSequence:
        L = trace.num_layers
        layers: list[int] = []
        experts: list[list[int]] = []
        counts: list[list[int]] | None = None
        tokens = trace.tokens_per_step()
        if np.all(tokens == 1):  # decode: every access is one token's top-k, already distinct
            per_access = np.sort(trace.ids, axis=2).reshape(-1, trace.top_k).tolist()  # [steps * L, k]
            experts = per_access
            layers = list(range(L)) * trace.num_steps
        else:
            counts = []
            for step in range(trace.num_steps):
                ids = trace.step_ids(step)  # [tokens, L, k]
                for layer in range(L):
                    unique, per_expert = np.unique(ids[:, layer], return_counts=True)
                    experts.append(unique.tolist())
                    counts.append(per_expert.tolist())
                    layers.append(layer)
        return cls(L, trace.num_experts, trace.top_k, layers, experts, tokens.tolist(), counts)


def future_uses(seq: AccessSequence) -> dict[int, list[int]]:
    """Every key -> the ascending access numbers at which it is used (Belady's future)."""
    future: dict[int, list[int]] = {}
    for t, keys in enumerate(seq.keys):
        for key in keys:
            times = future.get(key)
            if times is None:
                future[key] = [t]
            else:
                times.append(t)
    return future


def expert_counts(seq: AccessSequence) -> np.ndarray:  # int64 [layers, experts]
    """How many layer accesses used each expert (the profile of the static policy)."""
    counts = np.zeros((seq.num_layers, seq.num_experts), dtype=np.int64)
    for layer, ex in zip(seq.layers, seq.experts, strict=True):
        counts[layer, ex] += 1
    return counts
