"""Expert prediction in the runtime, on the reference model's held-out text (CPU).

Token-by-token decoding with teacher forcing: each held-out window restarts the context, its first token is a
one-token prefill and every later token a decode step with the KV cache, so every MoE layer call is one
token's top-k, the case prefetching is for. For each budget (a fraction of all experts in slots, global LRU)
and each prefetch mode, the runtime runs with the threaded copy engine (copies overlap compute on the CPU as
on the copy stream on CUDA; the same engine for every mode, so stall times compare) and reports:

- the predictor's recall and precision per layer and overall (:class:`cache_policies.guess_score.GuessScore`:
  each guess against the next access of its layer, before the cache filters it);
- demand misses, prefetch copies and their outcome, bytes moved, stall seconds (compute waiting for copies),
  wall seconds per token.

On the CPU a "copy" is a memcpy between two host buffers: stall seconds show how much waiting each mode
leaves, not what a PCIe link would cost; bytes moved and demand misses carry over to a GPU unchanged.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

import offload
from offload.config import OffloadConfig
from offload.hf.install import runtime_of
from offload.hf.skeleton import survey_checkpoint
from offload.runtime.budget import budget_for_slots

MODES = ("none", "history", "lookahead", "pre-attention")


@torch.no_grad()
def decode_teacher_forced(model: Any, windows: list[torch.Tensor]) -> int:
    """Feed each window token by token through the KV cache; returns the number of forward calls."""
    calls = 0
    for window in windows:
        cache = DynamicCache(config=model.config)
        for position in range(len(window)):
            model(input_ids=window[None, position : position + 1], past_key_values=cache, use_cache=True)
            calls += 1
    return calls


def run(
    path: Path, windows: list[torch.Tensor], slots: int, prefetch: str, max_context: int
) -> dict[str, Any]:
    """One budget and prefetch mode over ``windows``: the counters, and the predictor's score."""
    options: dict[str, Any] = dict(
        device="cpu", max_context=max_context, prefetch=prefetch, copy_engine="threaded", policy="lru"
    )
    config = OffloadConfig.create(1, **options)
    budget = budget_for_slots(survey_checkpoint(str(path), config.dtype, config), config, slots)
    model = offload.from_pretrained(path, vram_budget=budget, progress=False, **options)
    start = time.perf_counter()
    calls = decode_teacher_forced(model, windows)
    wall = time.perf_counter() - start
    stats = offload.stats(model)
    prefetcher = runtime_of(model).step.prefetcher
    offload.close(model)
    counters = stats.as_dict()
    return {
        "prefetch": prefetch,
        "slots": stats.slots,
        "tokens": calls,
        "wall_seconds": wall,
        "seconds_per_token": wall / calls,
        "demand_misses": stats.expert_misses,
        "hit_rate": stats.hit_rate,
        "bytes_moved": stats.bytes_host_to_device,
        "stall_seconds": stats.stall_seconds,
        **{k: counters[k] for k in ("prefetch_issued", "prefetch_used", "prefetch_late", "prefetch_wasted")},
        "score": None if prefetcher is None else prefetcher.score.as_dict(),
    }
