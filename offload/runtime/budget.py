"""Turn a VRAM budget into a slot count, or say plainly what the minimum is.

The budget is all the device memory the runtime may use::

    budget >= resident weights + KV cache(max_context) + workspace + slot table + slots * expert bytes

Resident weights are everything but the routed experts (embeddings, attention, norms, routers, shared
experts, dense MLP layers, lm_head). The workspace is an estimate of the activations of one forward over
the longest prompt the KV cache allows, or over one prefill chunk where generate() prefills in chunks
(:func:`prefill_chunk_of`), plus, on a CPU device with compressed experts, one expert read back to
the compute dtype (:func:`read_back_bytes`); pass ``workspace_bytes`` to override it.

:func:`plan_budget` is the one entry point (a model's survey and the config); :func:`fit_budget` is its
arithmetic on plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from offload.config import OffloadConfig
from offload.errors import BudgetError, OffloadError
from offload.memory.layout import ExpertLayout
from offload.runtime.model_survey import ModelSurvey
from offload.units import format_size


@dataclass(frozen=True)
class BudgetPlan:
    budget_bytes: int
    resident_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    slot_table_bytes: int
    expert_bytes: int  # one expert, padded as stored
    slots: int
    min_slots: int
    total_experts: int
    # tokens per prefill forward the workspace is planned for; None: a whole max_context prompt
    prefill_chunk: int | None = None

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_cache_bytes + self.workspace_bytes + self.slot_table_bytes

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + self.slots * self.expert_bytes

    def _chunked(self) -> str:
        return "" if self.prefill_chunk is None else f" (prefill in chunks of {self.prefill_chunk} tokens)"

    @property
    def minimum_bytes(self) -> int:
        return self.fixed_bytes + self.min_slots * self.expert_bytes

    def describe(self) -> str:
        return (
            f"resident weights {format_size(self.resident_bytes)}, KV cache {format_size(self.kv_cache_bytes)}, "
            f"workspace {format_size(self.workspace_bytes)}{self._chunked()}, {self.slots} expert slots x "
            f"{format_size(self.expert_bytes)} = {format_size(self.slots * self.expert_bytes)}"
        )


# cuBLAS(Lt) workspace torch allocates per handle on the compute stream (its default of 32 MiB on Hopper;
# less on older GPUs): device memory a forward takes that no activation accounts for.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20


# The smallest prefill chunk ``auto`` picks: below a few hundred tokens attention and the dense layers run
# short matrices, and every chunk pays the per-forward costs (a pass over every layer's weights).
MIN_AUTO_CHUNK = 256
# Tokens per expert a chunk should give on average: the Triton prefill kernel's smallest tile (BLOCK_M 16
# rows of one expert, offload/kernels/triton/launch_plan.py), so each expert's rows fill at least one tile.
ROWS_PER_EXPERT = 16


def prefill_chunk_of(survey: ModelSurvey, config: OffloadConfig) -> int | None:
    """The tokens per prefill forward: ``config.prefill_chunk`` (``auto``: the smallest chunk that gives every
    expert a tile's worth of rows on average, at least :data:`MIN_AUTO_CHUNK`, rounded up to a power of two:
    the smallest workspace, so the most slots, at which the kernels still run full tiles), or None where the
    whole prompt is one forward (chunking off, a chunk no shorter than ``max_context``, or ``auto`` for a model
    transformers cannot prefill in chunks: ``survey.unchunked_prefill`` says why; a number of tokens given for
    one is an OffloadError)."""
    choice = config.prefill_chunk
    if choice is None:
        return None
    if survey.unchunked_prefill:
        if choice == "auto":
            return None
        raise OffloadError(
            f"prefill_chunk={choice}: {survey.model_type} cannot prefill in chunks ({survey.unchunked_prefill}); "
            "use prefill_chunk=None (--prefill-chunk off)"
        )
    if choice == "auto":
        wanted = max(MIN_AUTO_CHUNK, -(-ROWS_PER_EXPERT * survey.num_experts // survey.top_k))
        choice = 1 << (wanted - 1).bit_length()
    return int(choice) if int(choice) < config.max_context else None


def plan_budget(survey: ModelSurvey, config: OffloadConfig) -> BudgetPlan:
    """The slots ``config``'s budget leaves for ``survey``'s model; BudgetError below the minimum."""
    chunk = prefill_chunk_of(survey, config)
    workspace = config.workspace_bytes
    if workspace is None:
        workspace = survey.workspace_bytes(chunk or config.max_context, config.max_context)
        if config.device.type == "cuda":
            workspace += CUBLAS_WORKSPACE_BYTES
        elif survey.layout.format != "float":
            workspace += read_back_bytes(survey.layout)
    plan = fit_budget(
        budget_bytes=config.vram_budget,
        resident_bytes=survey.resident_bytes,
        kv_cache_bytes=survey.kv_bytes_per_token * config.max_context,
        workspace_bytes=workspace,
        expert_bytes=survey.layout.nbytes,
        num_layers=survey.num_layers,
        num_experts=survey.num_experts,
        top_k=survey.top_k,
        per_layer=config.cache_scope == "layer",
    )
    return replace(plan, prefill_chunk=chunk)


def read_back_bytes(layout: ExpertLayout) -> int:
    """A CPU device's memory for one compressed expert read back to the compute dtype (the reference kernel, and
    the host kernels a call of many tokens picks): the larger matrix's values, its intermediate read-back
    (codes unpacked, MXFP4's two halves), and the other matrix's values while both are alive."""
    gate_up = layout.gate_up_rows * layout.hidden_size
    down = layout.hidden_size * layout.intermediate_size
    return (2 * max(gate_up, down) + gate_up + down) * layout.element_size


def budget_for_slots(survey: ModelSurvey, config: OffloadConfig, slots: int) -> int:
    """The budget that leaves exactly ``slots`` expert slots with ``config``'s other settings."""
    plan = plan_budget(survey, replace(config, vram_budget=2**62))
    return plan.fixed_bytes + slots * plan.expert_bytes


def fit_budget(
    budget_bytes: int,
    resident_bytes: int,
    kv_cache_bytes: int,
    workspace_bytes: int,
    expert_bytes: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    per_layer: bool,
) -> BudgetPlan:
    """Fit as many slots as the budget allows, up to every expert; raise BudgetError below the minimum.

    The minimum holds one layer's top-k experts (global cache) or top-k per layer (per-layer cache): with
    waves, that is enough to run any prefill.
    """
    total = num_layers * num_experts
    min_slots = top_k * num_layers if per_layer else top_k
    table = num_layers * num_experts * 4  # int32 slot table on the device
    plan = BudgetPlan(
        budget_bytes,
        resident_bytes,
        kv_cache_bytes,
        workspace_bytes,
        table,
        expert_bytes,
        0,
        min_slots,
        total,
    )
    free = budget_bytes - plan.fixed_bytes
    slots = min(max(free, 0) // expert_bytes, total)
    if per_layer:
        slots -= slots % num_layers  # every layer gets the same share
    if slots < min_slots:
        raise BudgetError(
            f"a VRAM budget of {format_size(budget_bytes)} is too small for this model and settings: the minimum is "
            f"{format_size(plan.minimum_bytes)} ({plan.minimum_bytes} bytes: resident weights "
            f"{format_size(resident_bytes)}, KV cache {format_size(kv_cache_bytes)}, workspace "
            f"{format_size(workspace_bytes)}, {min_slots} expert slots of {format_size(expert_bytes)})",
            plan.minimum_bytes,
        )
    return replace(plan, slots=slots)
