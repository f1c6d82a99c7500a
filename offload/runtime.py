"""The offload runtime: host store, slot pool, copy engine, cache and kernel, wired for one model.

Each MoE layer call goes: route (HF code) -> group pairs by expert (one host sync) -> plan (cache) ->
per wave: execute copies, compute the wave's experts out of their slots -> sum the top-k outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cache_policies import AccessPlan, ExpertCache, HistoryPredictor, Prefetch, next_layer
from offload.budget import BudgetPlan
from offload.config import OffloadConfig
from offload.counters import OffloadStats
from offload.forced import ForcedRouting
from offload.kernels import ExpertActivation, RoutedTokens, select_kernel
from offload.predict import LookaheadPredictor
from offload.recorder import RoutingRecorder
from offload.scheduler import Scheduler, policy_factory
from offload.slots import SlotPool
from offload.store import HostExpertStore
from offload.survey import ModelSurvey
from offload.transport import make_copy_engine

ExpertKernel = Callable[..., None]  # signature of offload.kernels.expert_pairs_torch


class OffloadRuntime:
    def __init__(
        self, config: OffloadConfig, survey: ModelSurvey, budget: BudgetPlan, model_name: str = ""
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.survey = survey
        self.budget = budget
        device = config.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self._memory_baseline = torch.cuda.memory_allocated(device)
        layers, experts = survey.num_layers, survey.num_experts
        self.store = HostExpertStore(survey.layout, layers, experts, pin=config.pin)
        self.pool = SlotPool(survey.layout, budget.slots, device)
        self.engine = make_copy_engine(
            self.pool,
            config.copy_engine,
            overlap=config.prefetch != "none",
            delay=config.copy_delay,
            seed=config.seed,
        )
        per_layer = config.cache_scope == "layer"
        self.cache = ExpertCache(
            layers,
            experts,
            budget.slots // layers if per_layer else budget.slots,
            policy_factory(config, layers, experts, survey.top_k),
            scope=config.cache_scope,
        )
        self.scheduler = Scheduler(self.cache, self.store, self.engine)
        self.kernel: ExpertKernel = select_kernel(config.kernel, device)
        self.activations: list[ExpertActivation | None] = [None] * layers
        self.layer_calls = 0
        self.recorder = RoutingRecorder(layers, experts) if config.record_trace else None
        self.history = (
            HistoryPredictor(layers, config.history_window) if config.prefetch == "history" else None
        )
        self.lookahead: LookaheadPredictor | None = None  # the loader sets it: it needs the model's routers
        self.forced: ForcedRouting | None = None  # benchmarks: expert choices replayed from a trace
        self.prefetch_used = 0
        self.prefetch_late = 0

    def attach_layer(
        self, layer: int, weights: dict[str, torch.Tensor], activation: ExpertActivation
    ) -> None:
        """Pack one MoE layer's HF expert tensors into the host store."""
        self.store.fill_layer(layer, weights)
        self.activations[layer] = activation

    @torch.no_grad()
    def forward_layer(
        self,
        layer: int,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, H]
        activation = self.activations[layer]
        if activation is None:
            raise RuntimeError(f"MoE layer {layer} was never attached to the runtime")
        if self.forced is not None:
            top_k_index = self.forced.ids(layer, top_k_index.shape[0], top_k_index.device)
        if self.recorder is not None:
            self.recorder.record(layer, top_k_index, top_k_weights)
        routed = RoutedTokens.build(hidden_states, top_k_index, top_k_weights, self.survey.num_experts)
        plan = self.scheduler.plan(layer, routed.experts)
        for expert in plan.prefetched:  # hits a prefetch made: was the copy there in time?
            slot = self.cache.slot_of(layer, expert)
            if slot is not None and self.engine.landed(slot):
                self.prefetch_used += 1
            else:
                self.prefetch_late += 1
        prefetch = self._prefetch(layer, routed, plan)
        tokens, top_k = top_k_index.shape
        # Same accumulation as transformers: weighted pairs in the promoted dtype, summed over k, cast back.
        out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        pairs_out = torch.zeros(
            (tokens * top_k, hidden_states.shape[-1]), dtype=out_dtype, device=hidden_states.device
        )
        for i, wave in enumerate(plan.waves):
            self.scheduler.execute(layer, wave, prefetch if i == 0 else None)
            self.kernel(routed, wave.experts, wave.slots, self.pool, activation, pairs_out)
            self.scheduler.finish(wave)
        self.layer_calls += 1
        return pairs_out.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _prefetch(self, layer: int, routed: RoutedTokens, plan: AccessPlan) -> Prefetch | None:
        """Predict the next layer's experts and reserve their slots (the same protocol as the simulator's:
        observe this access, then prefetch only after a single-wave access)."""
        if self.history is not None:
            self.history.observe(layer, routed.experts)
        if len(plan.waves) != 1:
            return None
        if self.history is not None:
            target = next_layer(layer, self.survey.num_layers, wrap=True)
            assert target is not None
            predicted = self.history.predict(target, self.survey.top_k)
        elif self.lookahead is not None:
            ids = self.lookahead.predict(layer, routed.hidden)
            if ids is None:
                return None
            target = layer + 1
            predicted = [e for e in torch.unique(ids).tolist() if 0 <= e < self.survey.num_experts]
        else:
            return None
        return self.cache.prefetch(target, predicted, layer, routed.experts)

    def close(self) -> None:
        self.engine.close()

    def stats(self) -> OffloadStats:
        device = self.config.device
        self.engine.synchronize()  # counters of copies still in flight
        peak = None
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - self._memory_baseline
        return OffloadStats(
            expert_hits=self.cache.hits,
            expert_misses=self.cache.misses,
            bytes_host_to_device=self.engine.bytes_copied,
            copy_seconds=self.engine.copy_seconds,
            slots=self.pool.num_slots,
            total_experts=self.survey.total_experts,
            budget_bytes=self.budget.budget_bytes,
            planned_bytes=self.budget.planned_bytes,
            peak_device_bytes=peak,
            layer_calls=self.layer_calls,
            waves=self.scheduler.waves,
            evictions=self.cache.evictions,
            prefetch_issued=self.cache.prefetch_issued,
            prefetch_used=self.prefetch_used,
            prefetch_late=self.prefetch_late,
            prefetch_wasted=self.cache.prefetch_wasted,
            stall_seconds=self.engine.stall_seconds,
        )
