"""The offload runtime of one model: it builds the parts and wires them; :class:`LayerStep` runs them.

Parts: the host store (every expert, pinned on CUDA), the slot pool (device memory for ``budget.slots``
experts), the copy engine between them, the expert cache (residency and the policy), the kernel, and
optionally a routing recorder and a prefetcher. Every MoE layer call goes through
:meth:`OffloadRuntime.forward_layer` to the step. :meth:`close` releases all of it at once.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from cache_policies import CopyOrCompute, HistoryPredictor, Predictor, Prefetcher
from cache_policies.prefetch import LowerTierCounts
from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.kernels import ExpertActivation, expert_pairs_torch, select_kernel
from offload.kernels.kernel_table import HostKernelPairs, KernelTable
from offload.memory.copy_engines import CopyEngine, make_copy_engine
from offload.memory.host_store import HostExpertStore
from offload.memory.int4pack import Int4PackCopy
from offload.memory.slot_pool import SlotPool
from offload.offload_stats import OffloadStats
from offload.runtime import host_rates
from offload.runtime.budget import BudgetPlan
from offload.runtime.expert_source import ExpertSource, InRam
from offload.runtime.host_compute import HostCompute, torch_threads_per_worker
from offload.runtime.host_plan import HostPlan
from offload.runtime.host_tier import HostTier
from offload.runtime.layer_step import LayerStep, RoutingOverride
from offload.runtime.model_survey import ModelSurvey
from offload.runtime.policy import build_cache
from offload.runtime.recorder import RoutingRecorder


class OffloadRuntime:
    def __init__(
        self,
        config: OffloadConfig,
        survey: ModelSurvey,
        budget: BudgetPlan,
        model_name: str = "",
        int4pack_copy: bool = False,
        host_tier_slots: int | None = None,
    ) -> None:
        """``int4pack_copy``: keep the int4/MXFP4 experts' copy for the int4pack host kernel as layers are stored
        (host RAM planned for it by the caller, :mod:`offload.runtime.host_plan`); unused with host compute off.
        ``host_tier_slots``: keep the experts on disk under that many host slots (the disk tier,
        :mod:`offload.runtime.host_tier`; the loader gives it its disk store) instead of all in host RAM."""
        if config.prefetch == "auto":
            raise ValueError(
                "prefetch='auto' is resolved per model by offload.hf.prefetch.resolve_prefetch first"
            )
        self.config = config
        self.model_name = model_name
        self.store_source = (
            ""  # how the loader filled the host store, for the summary (compressed-store cache)
        )
        self.survey = survey
        self.budget = budget
        # the loader's host RAM plan (None: wrapped, or a random model)
        self.host_plan: HostPlan | None = None
        device = config.device
        if device.type == "cuda":
            self._memory_baseline = torch.cuda.memory_allocated(device)
        self.store: HostExpertStore | None = None
        self.tier: HostTier | None = None
        if host_tier_slots is None:
            self.store = HostExpertStore(survey.layout, survey.num_layers, survey.num_experts, pin=config.pin)
            self.source: ExpertSource = InRam(self.store)
        else:
            self.tier = HostTier(survey.layout, build_cache(config, survey, host_tier_slots), pin=config.pin)
            self.source = self.tier
        self.pool = SlotPool(
            survey.layout, budget.slots, device, table_shape=(survey.num_layers, survey.num_experts)
        )
        self.engine = make_copy_engine(self.pool, config.copy_engine, overlap=config.prefetch != "none")
        self.cache = build_cache(config, survey, budget.slots)
        self.recorder = (
            RoutingRecorder(survey.num_layers, survey.num_experts) if config.record_trace else None
        )
        self.step = LayerStep(
            self.cache,
            self.source,
            self.pool,
            self.engine,
            select_kernel(config.kernel, device),
            survey.num_experts,
            self.recorder,
        )
        if config.prefetch == "history":
            self.use_predictor(HistoryPredictor(survey.num_layers, config.history_window))
        self.activations: list[ExpertActivation | None] = [None] * survey.num_layers
        # auto on a CPU device weighs nothing (there is no link) unless rates are given: off there.
        self.host_mode = config.host_compute
        if self.host_mode == "auto" and device.type != "cuda" and config.host_rates is None:
            self.host_mode = "off"
        # the kernel table is measured once the experts' activation is known (_setup_kernels): host compute
        # runs it, and so does a CPU device with kernel auto
        self._measure_kernels = device.type != "cuda" and config.kernel == "auto"
        self._kernels_ready = self.host_mode == "off" and not self._measure_kernels
        self.int4pack = (  # a copy of every expert: not for experts that do not fit in RAM once
            Int4PackCopy(survey.layout, survey.num_layers, survey.num_experts)
            if int4pack_copy and self.host_mode != "off" and self.store is not None
            else None
        )
        if self.host_mode != "off":
            self.step.host = HostCompute(
                self.source,
                self._fixed_table() or KernelTable.single("reference"),  # auto: replaced once measured
                config.host_threads,
                torch_threads_per_worker(config.host_threads) if device.type == "cuda" else None,
                self.int4pack,
            )
        self.closed = False
        # Whether by close() or by the runtime being dropped with its model: copies in flight land before the
        # slots and the pinned store they touch are released (invariant *slot-safety*); host workers finish
        # their reads of the store first too.
        self._release = weakref.finalize(
            self, _release, self.engine, self.pool, self.host_memory, self.step.host, self.int4pack
        )

    def attach_layer(
        self, layer: int, weights: dict[str, torch.Tensor], activation: ExpertActivation
    ) -> None:
        """Pack one MoE layer's HF expert tensors into the host store (the disk store with the disk tier)."""
        (self.store or self._tier()).fill_layer(layer, weights)
        self._stored(layer, activation)

    def attach_packed_layer(
        self, layer: int, fields: dict[str, torch.Tensor], activation: ExpertActivation
    ) -> None:
        """Store one MoE layer whose fields ``[E, ...]`` are already in the layout's format."""
        (self.store or self._tier()).fill_packed_layer(layer, fields)
        self._stored(layer, activation)

    def attach_stored_layer(self, layer: int, activation: ExpertActivation) -> None:
        """One MoE layer the disk tier's store already holds from an earlier load: nothing to write."""
        self._tier()
        self._stored(layer, activation)

    @property
    def host_memory(self) -> HostExpertStore | HostTier:
        """Where the experts are in host memory: the store, or the host tier's slots."""
        held = self.store if self.store is not None else self.tier
        assert held is not None
        return held

    def _tier(self) -> HostTier:
        if self.tier is None:
            raise RuntimeError("this runtime keeps every expert in host RAM: it has no disk tier")
        return self.tier

    def _stored(self, layer: int, activation: ExpertActivation) -> None:
        if self.int4pack is not None and self.store is not None:
            self.int4pack.fill_layer(
                layer, [self.store.views(layer, e) for e in range(self.survey.num_experts)]
            )
        self.activations[layer] = activation

    def use_predictor(self, predictor: Predictor) -> None:
        """Prefetch by ``predictor`` from now on (the loader attaches the lookahead one: it needs the routers)."""
        self.step.prefetcher = Prefetcher(
            self.cache, predictor, self.survey.top_k, lower=self.tier, reads_ahead=self.config.disk_read_ahead
        )

    @property
    def predictor(self) -> Predictor | None:
        prefetcher = self.step.prefetcher
        return None if prefetcher is None else prefetcher.predictor

    def override_routing(self, override: RoutingOverride | None) -> None:
        """Replace the routers' choices before they are recorded and served; None restores them."""
        self.step.routing_override = override

    def before_layer(self, layer: int, hidden_states: torch.Tensor) -> None:
        """The decoder layer of MoE layer ``layer`` is about to run on ``hidden_states`` ``[..., H]``: the
        pre-attention predictor's moment (installed as a forward pre-hook by offload.hf.install)."""
        if self.closed:
            raise OffloadError("this model was closed by offload.close(); load it again to use it")
        self.step.before_layer(layer, hidden_states)

    def forward_layer(
        self,
        layer: int,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, k]
        top_k_weights: torch.Tensor,  # [T, k]
    ) -> torch.Tensor:  # [T, H]
        if self.closed:
            raise OffloadError("this model was closed by offload.close(); load it again to use it")
        activation = self.activations[layer]
        if activation is None:
            raise RuntimeError(f"MoE layer {layer} was never attached to the runtime")
        if not self._kernels_ready:
            self._setup_kernels(activation)
        return self.step(layer, activation, hidden_states, top_k_index, top_k_weights)

    def prepare_kernels(self) -> None:
        """Measure the kernel table and set host compute up now, at the end of the load, rather than in the
        first layer call: the probes' device buffers (a copy target, one expert's matrices) then come out of
        the workspace and KV cache the plan reserves for a forward, which no forward holds yet (invariant
        *within-budget*)."""
        activation = self.activations[0]
        if not self._kernels_ready and activation is not None:
            self._setup_kernels(activation, self.budget.workspace_bytes + self.budget.kv_cache_bytes)

    def _fixed_table(self) -> KernelTable | None:
        """The kernel table a CPU device's chosen kernel fixes (``torch``: the reference), None when measured
        (``auto``) or on CUDA."""
        choice = self.config.kernel
        if self.config.device.type == "cuda" or choice == "auto":
            return None
        return KernelTable.single("reference" if choice in ("torch", "triton") else choice)

    def _setup_kernels(self, activation: ExpertActivation, device_room: int | None = None) -> None:
        """The kernel table (fixed by the kernel chosen, or measured once per machine) and the rule's rates
        (given, or measured; offload.runtime.host_rates); a CPU device with kernel auto computes every expert
        through the table. ``device_room``: the device bytes the probes may take (None: what they ask for)."""
        host = self.step.host
        layout = self.survey.layout
        given = self.config.host_rates
        need = host is not None and self.host_mode == "auto" and given is None
        # a fixed table only on a CPU device, which has no link, so no rates to measure
        table, measured = self._fixed_table(), None
        if table is None:
            table, measured = host_rates.resolve(
                layout,
                self.config.device,
                self.config.host_threads if host is None else host.threads,
                None if host is None else host.torch_threads,
                activation,
                need,
                int4pack=self.int4pack is not None,
                device_room=device_room,
            )
        if self._measure_kernels:
            self.step.kernel = select_kernel("auto", self.config.device, table)
        if host is not None:
            host.table = table
            self.step.rule = CopyOrCompute(self.host_mode, layout.nbytes, given or measured)
        self._kernels_ready = True

    @property
    def kernel_table(self) -> KernelTable | None:
        """The host kernels in use by token count: the CPU device's, or host compute's; None when neither runs
        host kernels (a CUDA device with host compute off) or before the first forward measured them."""
        kernel = self.step.kernel
        if isinstance(kernel, HostKernelPairs):
            return kernel.table
        if self.step.host is not None and self._kernels_ready:
            return self.step.host.table
        return None

    @property
    def rates(self) -> object:
        """The copy-or-compute rates in use (cache_policies.HostRates), None when off or not yet set up."""
        rule = self.step.rule
        return None if rule is None else rule.rates

    def close(self) -> None:
        """Release the copy thread or stream (after the copies in flight land), the slots and the pinned
        store. Idempotent; the model cannot run afterwards."""
        self.closed = True
        self._release()  # runs once

    def stats(self) -> OffloadStats:
        """Counters since load. Peak device memory is ``max_memory_allocated`` minus what was allocated when
        the runtime was built: the process-wide peak counter is not reset (it is the user's too), so a higher
        peak from earlier in the process shows here; reset it before loading to measure one model."""
        device = self.config.device
        if not self.closed:
            self.engine.synchronize()  # counters of copies still in flight
        peak = None
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - self._memory_baseline
        prefetcher = self.step.prefetcher
        host = self.step.host
        return OffloadStats(
            expert_hits=self.cache.hits,
            expert_misses=self.cache.misses,
            bytes_host_to_device=self.engine.bytes_copied,
            copy_seconds=self.engine.copy_seconds,
            slots=self.budget.slots,
            total_experts=self.survey.total_experts,
            budget_bytes=self.budget.budget_bytes,
            planned_bytes=self.budget.planned_bytes,
            peak_device_bytes=peak,
            layer_calls=self.step.layer_calls,
            waves=self.step.waves,
            evictions=self.cache.evictions,
            prefetch=self.config.prefetch,
            prefetch_issued=self.cache.prefetch_issued,
            prefetch_used=0 if prefetcher is None else prefetcher.used,
            prefetch_late=0 if prefetcher is None else prefetcher.late,
            prefetch_wasted=self.cache.prefetch_wasted,
            prefetch_recall=None if prefetcher is None else prefetcher.score.recall(),
            prefetch_precision=None if prefetcher is None else prefetcher.score.precision(),
            stall_seconds=self.engine.stall_seconds,
            expert_format=self.survey.layout.format_name,
            expert_bytes=self.survey.layout.nbytes,
            host_expert_calls=0 if host is None else host.calls,
            host_compute_seconds=0.0 if host is None else host.seconds,
            host_wait_seconds=0.0 if host is None else host.wait_seconds,
            host_compute=self.host_mode,
            host_kernel="" if host is None else host.table.describe(),
            kernels=self._kernels_description(),
            prefill_chunk=self.budget.prefill_chunk or 0,
            host_kernel_copy_bytes=0 if self.int4pack is None else self.int4pack.nbytes,
            store_source=self.store_source,
            **self._tier_counters(),
        )

    def _kernels_description(self) -> str:
        """What computes the experts in the slots: ``triton``, ``torch``, or the CPU device's host kernels."""
        kernel = self.step.kernel
        if isinstance(kernel, HostKernelPairs):
            packing = f" on {self.survey.layout.packing} slots" if self.survey.layout.packing else ""
            return kernel.table.describe() + packing
        return "torch" if kernel is expert_pairs_torch else "triton"

    def _tier_counters(self) -> dict[str, Any]:
        tier = self.tier
        if tier is None:
            return {}
        reader = tier.reader
        counts = LowerTierCounts.of(tier.cache)
        return dict(
            host_tier_slots=tier.pool.num_slots,
            host_tier_hits=counts.hits,
            host_tier_misses=counts.misses,
            host_tier_read_ahead=counts.read_ahead,
            disk_reads=0 if reader is None else reader.reads,
            disk_bytes=0 if reader is None else reader.bytes_read,
            disk_seconds=0.0 if reader is None else reader.seconds,
        )


def _release(
    engine: CopyEngine,
    pool: SlotPool,
    store: HostExpertStore | HostTier,
    host: HostCompute | None,
    int4pack: Int4PackCopy | None,
) -> None:
    if host is not None:
        host.close()  # waits for host jobs in flight: they read the store
    engine.close()  # waits for every copy in flight: none reads the host slots or store any more
    pool.release()
    store.release()
    if int4pack is not None:
        int4pack.release()
