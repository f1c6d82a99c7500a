"""One model on a CPU device in bf16, int8 and int4 at the same VRAM budget: decode and prefill tokens/s,
side by side in one run (issue 26).

The model is a random-weight OLMoE-1B-7B shape (hidden 2048, expert intermediate 1024, 64 experts, top-8) cut
to its first layers, its routing forced from the shared OLMoE trace's same layers (:mod:`offload_bench
.forced_routing`), so the expert cache sees real access patterns. Every variant runs at the same budget:
compressed experts take fewer bytes, so the same budget holds more of them. Prefetch is off (a predictor's
guesses come from the random routers, not the forced routing) and host compute is off (a CPU device's
default): hits, copies and kernels alone.

``int4-reference`` is int4 through the dequantize-then-compute reference (``kernel="torch"``), the CPU
device's only path before the kernel table: the speed-up of the rest is measured against it in the same run.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import offload
from cache_policies import RoutingTrace, load_trace
from offload.config import OffloadConfig
from offload.hf.install import runtime_of
from offload_bench.e2e_runs import timed_generation
from offload_bench.forced_routing import ForcedRouting
from offload_bench.host_experts import read_bandwidth
from offload_bench.shapes import SHAPES, SMOKE_SHAPES
from offload_bench.synthetic import random_offloaded

VARIANTS: dict[str, tuple[str | None, str]] = {  # name -> (quantize, kernel)
    "bf16": (None, "auto"),
    "int8": ("int8", "auto"),
    "int4": ("int4", "auto"),
    "int4-reference": ("int4", "torch"),
}


def first_layers(trace: RoutingTrace, layers: int) -> RoutingTrace:
    """The trace's first ``layers`` MoE layers."""
    return RoutingTrace(
        ids=np.ascontiguousarray(trace.ids[:, :layers]),
        step_offsets=trace.step_offsets,
        num_experts=trace.num_experts,
        model=trace.model,
        layer_ids=tuple(range(layers)),
        source=f"{trace.source} (first {layers} layers)",
    )


def run_variant(
    name: str,
    layers: int,
    budget: str,
    trace: RoutingTrace,
    prompt_tokens: int,
    warmup: int,
    tokens: int,
    max_context: int,
    smoke: bool,
) -> dict[str, Any]:
    quantize, kernel = VARIANTS[name]
    shape = (SMOKE_SHAPES if smoke else SHAPES)["olmoe-1b-7b"]
    hf_config = shape.build_config(layers)
    config = OffloadConfig.create(
        budget,
        device="cpu",
        dtype="bf16",
        max_context=max_context,
        quantize=quantize,
        kernel=kernel,
        prefetch="none",
        host_compute="off",
    )
    began = time.perf_counter()
    model = random_offloaded(hf_config, config, seed=0, progress=False)
    build_s = time.perf_counter() - began
    runtime = runtime_of(model)
    survey = runtime.survey
    offload.override_routing(model, ForcedRouting(trace, survey.num_layers, survey.num_experts, survey.top_k))
    prompt = torch.randint(
        0, hf_config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    timed = timed_generation(model, config.device, prompt, warmup, tokens, lambda: offload.stats(model))
    snaps = timed.snapshots
    before, after = snaps["warm"], snaps["decoded"]
    hits = after.expert_hits - before.expert_hits
    misses = after.expert_misses - before.expert_misses
    layout = survey.layout
    decode_s = timed.decode_s
    stats = offload.stats(model)
    row = dict(
        variant=name,
        quantize=quantize or "none",
        kernel_option=kernel,
        expert_format=layout.format_name,
        packing=layout.packing or "canonical",
        kernels=stats.kernels,
        expert_bytes=layout.nbytes,
        slots=runtime.budget.slots,
        total_experts=survey.total_experts,
        slot_share=round(runtime.budget.slots / survey.total_experts, 4),
        host_store_bytes=runtime.host_memory.nbytes,
        build_seconds=round(build_s, 2),
        prompt_tokens=prompt_tokens,
        prefill_seconds=round(timed.prefill_s, 3),
        prefill_tokens_per_s=round(prompt_tokens / timed.prefill_s, 2),
        decode_tokens=tokens,
        decode_seconds=round(decode_s, 3),
        decode_tokens_per_s=round(tokens / decode_s, 3),
        decode_hit_rate=round(hits / max(1, hits + misses), 4),
        decode_copied_gb_per_token=round(misses * layout.nbytes / tokens / 1e9, 4),
        # expert bytes the kernels read per second of decode: every use reads its expert's bytes once
        decode_expert_gbps=round((hits + misses) * layout.nbytes / decode_s / 1e9, 3),
    )
    offload.close(model)
    return row


def run(args: Any) -> dict[str, Any]:
    layers = 2 if args.smoke else args.layers
    trace = first_layers(load_trace(args.trace), layers)
    gib = 0.25 if args.smoke else 0.5
    read = read_bandwidth(gib) / 1e9  # before the runs and after them: this VM's bandwidth moves
    rows = []
    for name in args.variants.split(","):
        row = run_variant(
            name,
            layers,
            args.vram_budget,
            trace,
            args.prompt_tokens,
            args.warmup_tokens,
            args.decode_tokens,
            args.max_context,
            args.smoke,
        )
        row["decode_share_of_read"] = round(row["decode_expert_gbps"] / read, 3)  # the read before the runs
        rows.append(row)
        print(
            f"{name:15s} {row['slots']:4d}/{row['total_experts']} slots, hit {row['decode_hit_rate']:.1%}, "
            f"decode {row['decode_tokens_per_s']:.2f} tok/s, prefill {row['prefill_tokens_per_s']:.1f} tok/s, "
            f"{row['kernels']}",
            flush=True,
        )
    read_after = read_bandwidth(gib) / 1e9
    base = {r["variant"]: r for r in rows}.get("bf16")
    if base is not None:
        for r in rows:
            r["decode_vs_bf16"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
            r["prefill_vs_bf16"] = round(r["prefill_tokens_per_s"] / base["prefill_tokens_per_s"], 3)
    return dict(
        read_gbps_before=round(read, 2),
        read_gbps_after=round(read_after, 2),
        trace=trace.describe(),
        layers=layers,
        rows=rows,
    )
