"""Prefill under demand paging on a CPU device: a wave at a time against streamed waves, side by side (issue 27).

When a prefill chunk needs more experts in a layer than the slots hold, the layer runs in waves. A wave at a
time (``stream_groups`` 1) copies a wave, computes it once every copy has landed, then copies the next wave
into the same slots: copies and compute never overlap. Streamed (``offload.runtime.layer_step
.STREAM_GROUPS``), each wave is computed in groups as their copies land, and the next wave's copy into a slot
starts as soon as the group that read it releases it. Both run the same plan, so they copy the same bytes and
give the same bits; only the time differs. The third mode streams with a predictor (history, over the previous
runs of the same prompt): the prefetch protocol then also copies the next layer's experts into the slots a
chunk's last wave leaves free, while that wave computes; its copies count in its bytes.

The model is a random-weight OLMoE-1B-7B shape cut to its first layers, with its routing forced from the
shared OLMoE trace, in bf16 on the CPU device with the threaded copy engine (a worker thread copies while
the caller computes, the CPU twin of the CUDA copy stream), prefetch and host compute off.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import offload
from cache_policies import HistoryPredictor, load_trace
from offload.config import OffloadConfig
from offload.hf.install import runtime_of
from offload_bench.cpu_formats import first_layers
from offload_bench.forced_routing import ForcedRouting
from offload_bench.shapes import SHAPES, SMOKE_SHAPES
from offload_bench.synthetic import random_offloaded

# name -> (stream_groups, None: the runtime's default; whether a predictor prefetches)
MODES = {"wave-at-a-time": (1, False), "streamed": (None, False), "streamed+next-layer": (None, True)}


def run(args: Any) -> dict[str, Any]:
    layers = 2 if args.smoke else args.layers
    shape = (SMOKE_SHAPES if args.smoke else SHAPES)["olmoe-1b-7b"]
    hf_config = shape.build_config(layers)
    trace = first_layers(load_trace(args.trace), layers)
    config = OffloadConfig.create(
        args.vram_budget,
        device="cpu",
        dtype="bf16",
        max_context=args.max_context,
        prefill_chunk=args.prefill_chunk,
        copy_engine="threaded",
        prefetch="none",
        host_compute="off",
    )
    model = random_offloaded(hf_config, config, seed=0, progress=False)
    runtime = runtime_of(model)
    survey = runtime.survey
    default_groups = runtime.step.stream_groups
    prompt = torch.randint(
        0, hf_config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    rows: dict[str, dict[str, Any]] = {name: {"seconds": []} for name in MODES}
    predictor = HistoryPredictor(survey.num_layers, window=8)
    for _ in range(args.repeats):
        for name, (groups, predicts) in MODES.items():  # interleaved: the machine's noise falls on all alike
            runtime.step.stream_groups = default_groups if groups is None else groups
            runtime.step.prefetcher = None
            if predicts:
                runtime.use_predictor(predictor)
            offload.override_routing(
                model, ForcedRouting(trace, survey.num_layers, survey.num_experts, survey.top_k)
            )
            with torch.no_grad():  # untimed, so that every timed run starts from the same cache state
                model.generate(prompt, max_new_tokens=1, do_sample=False)  # type: ignore[operator]
            before = offload.stats(model)
            offload.override_routing(
                model, ForcedRouting(trace, survey.num_layers, survey.num_experts, survey.top_k)
            )
            began = time.perf_counter()
            with torch.no_grad():  # the prefill, and its first token
                model.generate(prompt, max_new_tokens=1, do_sample=False)  # type: ignore[operator]
            seconds = time.perf_counter() - began
            after = offload.stats(model)
            row = rows[name]
            row["seconds"].append(seconds)
            row["stream_groups"] = runtime.step.stream_groups
            row["stall_seconds"] = round(after.stall_seconds - before.stall_seconds, 3)
            row["copy_seconds"] = round(after.copy_seconds - before.copy_seconds, 3)
            row["bytes_per_prefill_token"] = (
                after.bytes_host_to_device - before.bytes_host_to_device
            ) // args.prompt_tokens
            row["waves_per_layer_call"] = round(
                (after.waves - before.waves) / max(1, after.layer_calls - before.layer_calls), 2
            )
            row["prefetch_issued"] = after.prefetch_issued - before.prefetch_issued
            row["prefetch_used"] = after.prefetch_used - before.prefetch_used
            row["prefetch_late"] = after.prefetch_late - before.prefetch_late
    for row in rows.values():
        best = min(row["seconds"])
        row["prefill_seconds_best"] = round(best, 3)
        row["prefill_tokens_per_s"] = round(args.prompt_tokens / best, 1)
        row["seconds"] = [round(s, 3) for s in row["seconds"]]
    offload.close(model)
    base, streamed, ahead = rows["wave-at-a-time"], rows["streamed"], rows["streamed+next-layer"]
    return dict(
        layers=layers,
        trace=trace.describe(),
        slots=runtime.budget.slots,
        total_experts=survey.total_experts,
        prefill_chunk=runtime.budget.prefill_chunk,
        prompt_tokens=args.prompt_tokens,
        expert_bytes=survey.layout.nbytes,
        modes=rows,
        speedup=round(base["prefill_seconds_best"] / streamed["prefill_seconds_best"], 3),
        speedup_next_layer=round(base["prefill_seconds_best"] / ahead["prefill_seconds_best"], 3),
        same_bytes=base["bytes_per_prefill_token"] == streamed["bytes_per_prefill_token"],
    )
