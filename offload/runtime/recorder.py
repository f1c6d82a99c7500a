"""Record the routing of a real run in the native trace format (cache_policies.RoutingTrace).

One step is one model forward: the first MoE layer's call opens it. Every MoE layer call adds its
``[tokens, top_k]`` expert ids (and router weights); a step that did not reach every layer is dropped.
"""

from __future__ import annotations

import numpy as np
import torch

from cache_policies import RoutingTrace
from offload.kernels.routing import read_to_host


class RoutingRecorder:
    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._steps: list[np.ndarray] = []  # [tokens, layers, top_k] per step
        self._weights: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []  # the open step, one [tokens, top_k] per layer so far
        self._open_weights: list[np.ndarray] = []

    def record(self, layer: int, ids: np.ndarray, top_k_weights: torch.Tensor) -> None:
        """``ids``: the layer call's expert ids ``[T, k]``, already on the host; the weights ``[T, k]`` are read
        here (the one extra device-to-host read per layer that recording costs)."""
        if layer == 0:
            self._ids, self._open_weights = [], []
        if layer != len(self._ids):  # a layer was skipped (an aborted forward): drop the partial step
            self._ids, self._open_weights = [], []
            return
        self._ids.append(ids.astype(np.int64, copy=False))
        self._open_weights.append(read_to_host(top_k_weights.detach().float()))
        if len(self._ids) == self.num_layers:
            self._steps.append(np.stack(self._ids, axis=1))
            self._weights.append(np.stack(self._open_weights, axis=1))
            self._ids, self._open_weights = [], []

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def trace(self, model: str = "", expert_bytes: int | None = None) -> RoutingTrace:
        return RoutingTrace.from_steps(
            self._steps,
            self.num_experts,
            weights=self._weights,
            model=model,
            expert_bytes=expert_bytes,
            source="recorded by moe-offload",
        )
