"""Stage ``budget``: a real-shape model (Qwen3-30B-A3B's expert and attention shapes, 4 MoE layers) at three
budgets, generating from the longest prompt the KV-cache reserve allows. Peak device memory against the
budget and against the planner's figure, term by term: what loading took against resident weights + slots,
and what generating added against workspace + KV cache; allocated (``max_memory_allocated``), reserved
(``max_memory_reserved``) and what the driver reports in use (``mem_get_info``, CUDA context included)."""

from __future__ import annotations

import gc
from typing import Any

import torch

import offload
from offload.config import OffloadConfig
from offload.hf.install import runtime_of
from offload.runtime.budget import budget_for_slots
from offload_bench.gpu_check.part import Part
from offload_bench.shapes import SHAPES, SMOKE_SHAPES
from offload_bench.synthetic import random_offloaded, shape_survey

LAYERS = 4
FRACTIONS = (0.125, 0.25, 0.5)  # of all experts, in slots
NEW_TOKENS = 8
TARGET = "peak device memory <= budget"


def run(part: Part, seconds: float) -> None:
    cuda = torch.cuda.is_available() and not part.smoke
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape = (SMOKE_SHAPES if part.smoke else SHAPES)["qwen3-30b-a3b"]
    hf_config = shape.build_config(LAYERS)
    dtype = torch.float32 if part.smoke else torch.bfloat16
    max_context = 64 if part.smoke else 4096
    survey = shape_survey(hf_config, dtype)
    part.set(
        device=str(device),
        shape=f"{shape.name}, {LAYERS} of {shape.layers} layers",
        max_context=max_context,
        prompt_tokens=max_context - NEW_TOKENS,
        new_tokens=NEW_TOKENS,
        rows=[],
    )
    for fraction in FRACTIONS:
        sizing = OffloadConfig.create(1, device=device, dtype=dtype, max_context=max_context)
        slots = max(survey.top_k, round(fraction * survey.total_experts))
        budget = budget_for_slots(survey, sizing, slots)
        row = measure(hf_config, device, dtype, budget, max_context, fraction)
        part.add("rows", row)
        peak = row.get("peak_allocated_bytes")
        part.target(
            TARGET,
            None if peak is None else round(peak / budget, 4),
            None if peak is None else peak <= budget,
            budget_bytes=budget,
            peak_allocated_bytes=peak,
            slot_fraction=fraction,
        )


def measure(
    hf_config, device: torch.device, dtype: torch.dtype, budget: int, max_context: int, fraction: float
) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
        base_reserved = torch.cuda.memory_reserved(device)
    config = OffloadConfig.create(budget, device=device, dtype=dtype, max_context=max_context)
    model: Any = random_offloaded(hf_config, config, progress=False)
    plan = runtime_of(model).budget
    row: dict = dict(
        slot_fraction=fraction,
        budget_bytes=budget,
        planned_bytes=plan.planned_bytes,
        planned=dict(
            resident_bytes=plan.resident_bytes,
            kv_cache_bytes=plan.kv_cache_bytes,
            workspace_bytes=plan.workspace_bytes,
            slot_table_bytes=plan.slot_table_bytes,
            slots=plan.slots,
            slot_bytes=plan.slots * plan.expert_bytes,
        ),
    )
    if cuda:
        loaded = torch.cuda.memory_allocated(device) - base_alloc
        row["loaded_bytes"] = loaded
        row["loaded_vs_planned_resident_and_slots"] = loaded - (
            plan.resident_bytes + plan.slots * plan.expert_bytes
        )
    prompt = torch.randint(3, int(hf_config.get_text_config().vocab_size), (1, max_context - NEW_TOKENS))
    with torch.inference_mode():
        model.generate(
            prompt.to(device), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
        )
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base_alloc
        free, total = torch.cuda.mem_get_info(device)
        row.update(
            peak_allocated_bytes=peak,
            peak_reserved_bytes=torch.cuda.max_memory_reserved(device) - base_reserved,
            driver_used_bytes=total - free,
            generate_added_bytes=peak - row["loaded_bytes"],
            planned_workspace_and_kv_bytes=plan.workspace_bytes + plan.kv_cache_bytes,
            within_budget=peak <= budget,
            over_planned_bytes=peak - plan.planned_bytes,
        )
    offload.close(model)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row
