"""One MoE layer call's routing, grouped by expert once and shared by every wave and kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutedTokens:
    """Token-expert pairs of one layer call. Pair ``p = t * top_k + j`` is token ``t``'s ``j``-th choice."""

    hidden: torch.Tensor  # [T, H]
    top_k_index: torch.Tensor  # [T, k] int64
    top_k_weights: torch.Tensor  # [T, k]
    pairs_by_expert: torch.Tensor  # [T*k] int64: pair ids sorted by expert, stable (token order inside one)
    offsets: list[int]  # [E + 1] host: pairs of expert e are pairs_by_expert[offsets[e]:offsets[e+1]]
    experts: list[int]  # experts with at least one pair, ascending

    @property
    def top_k(self) -> int:
        return self.top_k_index.shape[1]

    @classmethod
    def build(
        cls, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
    ) -> RoutedTokens:
        flat = top_k_index.reshape(-1)
        pairs_by_expert = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)[
            :num_experts
        ].tolist()  # the layer's one host sync
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        experts = [e for e, c in enumerate(counts) if c]
        return cls(hidden, top_k_index, top_k_weights, pairs_by_expert, offsets, experts)
