"""What each shape of the end-to-end benchmark gets: the depth that fits host RAM, the VRAM budget of its runs,
and the routing trace it can replay."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from offload_bench.shapes import Shape

if TYPE_CHECKING:
    import torch

GB = 1e9


def fit_host_ram(
    shape: Shape, survey: Any, variants: list[str], available: int, asked: int | None
) -> dict[str, Any]:
    """How many layers fit in host RAM, for our runs and for accelerate's (never resident together).

    Ours: the host store (one pinned block per layer, pinned at its exact size: offload.memory.host_memory), the
    bank of random experts it is filled from, one layer in flight. Accelerate: every weight. Both: 6 GiB for
    the process (CUDA context, libraries), and 8% of what is available is left free.
    """
    expert_bytes, experts = survey.layout.nbytes, survey.num_experts
    store_layer = experts * expert_bytes
    # One layer in flight (its tensors and their packed copy), the bank, the process itself.
    extra = 2 * experts * expert_bytes + min(8, experts) * expert_bytes + 6 * 2**30

    def need(layers: int) -> dict[str, int]:
        return dict(
            offloaded=layers * store_layer + extra,
            accelerate=survey.resident_bytes + layers * experts * expert_bytes + extra,
        )

    def fits(layers: int) -> bool:
        return all(need(layers)[k] <= 0.92 * available for k in need(layers) if k in used)

    used = {"accelerate" if v == "accelerate" else "offloaded" for v in variants}
    layers = min(asked or shape.layers, shape.layers)
    depth = layers
    while depth > 1 and not fits(depth):
        depth -= 1
    fit: dict[str, Any] = dict(
        available_bytes=available,
        layers_full=shape.layers,
        layers=depth,
        need_bytes=need(depth),
    )
    if depth < layers:
        wanted = max(need(layers)[k] for k in used)
        fit["truncated"] = (
            f"cut from {layers} to {depth} layers to fit host RAM: {wanted / GB:.0f} GB needed, "
            f"{available / GB:.0f} GB available"
        )
    elif layers < shape.layers:
        fit["truncated"] = f"cut to {layers} of {shape.layers} layers by --layers"
    return fit


def shape_budget(
    args: argparse.Namespace, full: Any, cut: Any, device: torch.device, dtype: torch.dtype
) -> tuple[int, str]:
    """The VRAM budget of every run on one shape, ours and accelerate's, and how it was chosen."""
    from offload.config import OffloadConfig
    from offload.runtime.budget import budget_for_slots, plan_budget

    sizing = OffloadConfig.create(1, device=device, dtype=dtype, max_context=args.max_context)
    if args.smoke:  # a size means nothing for tiny widths: slots for a quarter of the experts
        return budget_for_slots(
            cut, sizing, max(cut.top_k, cut.total_experts // 4)
        ), "slots for 1/4 of the experts"
    given = OffloadConfig.create(args.vram_budget, device=device, dtype=dtype, max_context=args.max_context)
    if not args.scale_budget or cut.num_layers == full.num_layers:
        return given.vram_budget, f"--vram-budget {args.vram_budget}"
    fraction = plan_budget(full, given).slots / full.total_experts
    slots = max(cut.top_k, round(fraction * cut.total_experts))
    note = (
        f"scaled: {slots} slots of {cut.total_experts} experts, the {fraction:.1%} that {args.vram_budget} "
        f"holds of the full {full.num_layers}-layer model"
    )
    return budget_for_slots(cut, sizing, slots), note


def fitting_trace(trace: Any, shape: Shape, s: Any) -> Any:
    """``trace`` where it fits the shape (MoE layers, experts, top-k), cut to the model's layers; else None."""
    import dataclasses

    if trace is None or (trace.num_layers, trace.top_k) != (shape.layers, s.top_k):
        return None
    if trace.num_experts > s.num_experts:
        return None
    cut = s.num_layers  # --layers or the host RAM fit may have cut the model: replay the first layers
    return dataclasses.replace(
        trace,
        ids=trace.ids[:, :cut],
        weights=None if trace.weights is None else trace.weights[:, :cut],
        layer_ids=None if trace.layer_ids is None else trace.layer_ids[:cut],
    )
