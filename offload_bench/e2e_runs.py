"""One run of the end-to-end benchmark: an offloaded variant or accelerate's baseline on one model shape,
timed the same way, with the counters of each phase. The driver is :mod:`offload_bench.e2e`."""

from __future__ import annotations

import argparse
import dataclasses
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload_bench.machine import free_memory, sync, torch_pinned_allocator_bytes
from offload_bench.shapes import Shape

if TYPE_CHECKING:
    import torch
    import transformers

    from offload.memory.host_store import HostExpertStore
    from offload.runtime.host_tier import HostTier

GB = 1e9
PREFETCH = {
    "lru": "none",
    "history": "history",
    "lookahead": "lookahead",
    "pre-attention": "pre-attention",
    "int4": "none",
    "lru-host-off": "none",
    "int4-disk": "none",
}
# variant -> experts quantized while loading (issue 12: int4 is LRU with experts in int4, groups of 64)
QUANTIZE = {"int4": "int4", "int4-disk": "int4"}
HOST_COMPUTE = {"lru-host-off": "off"}  # every other offloaded variant: the default, auto
# variant -> the share of the experts in host slots, the rest on disk (issue 25: the disk tier)
DISK_TIER = {"int4-disk": 0.5}


@dataclass
class Timed:
    prefill_s: float
    decode_s: float
    snapshots: dict[str, Any]  # counters at "start", "prefilled", "warm", "decoded"


def timed_generation(
    model: transformers.PreTrainedModel,
    device: torch.device,
    prompt: torch.Tensor,  # [1, P] on the model's first device
    warmup: int,
    tokens: int,
    snapshot: Callable[[], Any],
) -> Timed:
    """A throwaway pass (prompt and ``warmup`` tokens: kernels compile, the expert cache warms), then the timed
    one on a fresh KV cache: prefill the prompt, ``warmup`` untimed tokens, ``tokens`` timed ones, greedy.
    Counters are read between phases only: reading them waits for copies in flight."""
    import torch
    from transformers import DynamicCache

    def step(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1:].argmax(-1)  # [1, 1]

    def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        sync(device)
        start = time.perf_counter()
        ids = fn()
        sync(device)
        return ids, time.perf_counter() - start

    def decode(ids: torch.Tensor, cache: Any, n: int) -> torch.Tensor:
        for _ in range(n):
            ids = step(ids, cache)
        return ids

    with torch.no_grad():  # as generate() runs
        cache = DynamicCache(config=model.config)
        decode(step(prompt, cache), cache, warmup)
        sync(device)
        snaps = {"start": snapshot()}
        cache = DynamicCache(config=model.config)
        ids, prefill_s = timed(lambda: step(prompt, cache))
        snaps["prefilled"] = snapshot()
        ids = decode(ids, cache, warmup)
        sync(device)
        snaps["warm"] = snapshot()
        _, decode_s = timed(lambda: decode(ids, cache, tokens))
        snaps["decoded"] = snapshot()
    return Timed(prefill_s, decode_s, snaps)


_COUNTERS = (
    "expert_hits",
    "expert_misses",
    "bytes_host_to_device",
    "copy_seconds",
    "stall_seconds",
    "prefetch_issued",
    "prefetch_used",
    "prefetch_late",
    "prefetch_wasted",
    "layer_calls",
    "waves",
    "evictions",
    "host_expert_calls",
    "host_compute_seconds",
    "host_tier_hits",
    "host_tier_misses",
    "disk_reads",
    "disk_bytes",
    "disk_seconds",
)


def counters(after: Any, before: Any, peak: float, expert_bytes: int) -> dict[str, Any]:
    """One phase's counters (the difference of two OffloadStats) and what follows from them alone."""
    c: dict[str, Any] = {k: getattr(after, k) - getattr(before, k) for k in _COUNTERS}
    uses = c["expert_hits"] + c["expert_misses"] + c["host_expert_calls"]
    gbps = c["bytes_host_to_device"] / c["copy_seconds"] / GB if c["copy_seconds"] > 0 else None
    c.update(
        expert_uses=uses,
        hit_rate=c["expert_hits"] / uses if uses else None,
        demand_missed_bytes=c["expert_misses"] * expert_bytes,
        copy_gb_per_s=gbps,
        copy_fraction_of_peak=None if gbps is None else gbps * GB / peak,
    )
    return c


def routing_label(trace_path: Path | None) -> str:
    if trace_path is not None:
        return f"forced from trace {trace_path.name}"
    return "random: the model's own random-weight routers"


def common(timed: Timed, prompt: torch.Tensor, warmup: int, tokens: int) -> dict[str, Any]:
    return dict(
        prompt_tokens=int(prompt.shape[1]),
        prefill_s=timed.prefill_s,
        prefill_tok_per_s=prompt.shape[1] / timed.prefill_s,
        warmup_tokens=warmup,
        decode_tokens=tokens,
        decode_s=timed.decode_s,
        decode_tok_per_s=tokens / timed.decode_s,
        s_per_token=timed.decode_s / tokens,
    )


def host_memory_fields(store: HostExpertStore | HostTier, device: torch.device) -> dict[str, Any]:
    """Host memory behind a run: the expert store's bytes; how many of them are page-locked, from the
    store's own record of the layers it registered with ``cudaHostRegister`` (0 when it was not asked to pin,
    short of the store when pinning failed part-way); and what torch's caching pinned allocator owns (None off
    CUDA), which the store does not go through, so it is not the store's pinned memory."""
    return dict(
        host_store_bytes=store.nbytes,
        host_store_pinned_bytes=store.pinned_nbytes,
        torch_pinned_allocator_bytes=torch_pinned_allocator_bytes() if device.type == "cuda" else None,
    )


def offloaded_config(variant: str, args: argparse.Namespace, ctx: dict[str, Any]) -> Any:
    """The OffloadConfig of an offloaded variant's run."""
    from offload.config import OffloadConfig

    options = dict(
        policy=args.policy,
        prefetch=PREFETCH[variant],
        quantize=QUANTIZE.get(variant),
        store_cache=False,  # a random model has no checkpoint to key a cached store by
        max_context=args.max_context,
        seed=args.seed,
        host_compute=HOST_COMPUTE.get(variant, "auto"),
    )
    config = OffloadConfig.create(ctx["budget"], device=ctx["device"], dtype=ctx["dtype"], **options)
    share = DISK_TIER.get(variant)
    if share is None:
        return config
    return dataclasses.replace(
        config,
        disk_tier="always",
        store_dir=str(ctx["store_dir"]),
        host_memory_limit=host_tier_limit(ctx["survey"], config, share),
    )


def host_tier_limit(survey: Any, config: Any, share: float) -> int:
    """The host_memory_limit that gives ``share`` of the experts host slots."""
    from offload.hf.expert_formats import with_format
    from offload.runtime.budget import plan_budget
    from offload.runtime.host_plan import disk_tier_limit

    s = with_format(survey, config, None)
    device = plan_budget(s, config).planned_bytes if config.device.type == "cpu" else 0
    return disk_tier_limit(s, max(s.top_k, round(share * s.total_experts)), device)


def run_offloaded(
    shape: Shape, hf_config: Any, variant: str, args: argparse.Namespace, ctx: dict[str, Any]
) -> dict[str, Any]:
    import torch

    import offload
    from offload.hf.install import runtime_of
    from offload_bench.forced_routing import ForcedRouting
    from offload_bench.synthetic import random_offloaded

    device, peak, s = ctx["device"], ctx["peak"], ctx["survey"]
    config = offloaded_config(variant, args, ctx)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = random_offloaded(hf_config, config, seed=args.seed, progress=False)
    build_s = time.perf_counter() - start
    runtime = runtime_of(model)
    layout = runtime.survey.layout  # the variant's own format: int4 experts are ~0.28 of bf16's bytes
    if ctx["trace"] is not None:
        offload.override_routing(model, ForcedRouting(ctx["trace"], s.num_layers, s.num_experts, s.top_k))
    host_memory = host_memory_fields(runtime.host_memory, device)
    timed = timed_generation(
        model, device, ctx["prompt"], args.warmup_tokens, args.decode_tokens, runtime.stats
    )
    snaps = timed.snapshots
    decode = counters(snaps["decoded"], snaps["warm"], peak, layout.nbytes)
    row: dict[str, Any] = dict(
        shape=shape.name,
        variant=variant,
        status="ran",
        policy=args.policy,
        prefetch=PREFETCH[variant],
        expert_format=layout.format_name,
        host_compute=runtime.host_mode,
        host_kernel="" if runtime.step.host is None else runtime.step.host.table.describe(),
        host_tier_slots=None if runtime.tier is None else runtime.tier.pool.num_slots,
        routing=routing_label(ctx["trace_path"]),
    )
    row.update(common(timed, ctx["prompt"], args.warmup_tokens, args.decode_tokens))
    missed = decode["demand_missed_bytes"] / args.decode_tokens
    floor = missed / peak
    peak_device = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    row.update(
        layers=s.num_layers,
        experts_per_layer=s.num_experts,
        top_k=s.top_k,
        expert_bytes=layout.nbytes,
        slots=runtime.pool.num_slots,
        total_experts=s.total_experts,
        budget_bytes=runtime.budget.budget_bytes,
        planned_bytes=runtime.budget.planned_bytes,
        peak_device_bytes=peak_device,
        within_budget=None if peak_device is None else peak_device <= runtime.budget.budget_bytes,
        **host_memory,
        build_s=build_s,
        stall_fraction=decode["stall_seconds"] / timed.decode_s,
        demand_missed_bytes_per_token=missed,
        floor_s_per_token=floor,
        time_over_floor=row["s_per_token"] / floor if floor > 0 else None,
        link_floor_s_per_token=decode["bytes_host_to_device"] / args.decode_tokens / peak,
        decode=decode,
        prefill=counters(snaps["prefilled"], snaps["start"], peak, layout.nbytes),
        notes=[],
    )
    if ctx["trace"] is None:
        row["notes"].append("random routing: hit rates and prefetch accuracy are not representative")
    elif variant in ("lookahead", "pre-attention"):
        row["notes"].append(
            f"{variant} guesses with the model's random routers while the trace forces the choices: the guesses "
            f"are unrelated to the experts used, so this row measures prefetch overhead, not {variant} accuracy"
        )
    alive = weakref.ref(runtime)
    offload.close(model)
    del model, runtime, snaps, timed
    free_memory(device)
    row["freed"] = alive() is None  # nothing kept the model: its host store went back before the next build
    return row


def run_accelerate(
    shape: Shape, hf_config: Any, args: argparse.Namespace, ctx: dict[str, Any]
) -> dict[str, Any]:
    import torch

    from offload_bench.synthetic import random_plain

    device = ctx["device"]
    row: dict[str, Any] = dict(
        shape=shape.name,
        variant="accelerate",
        routing="random: its own routers (its "
        "hooks copy every offloaded weight at every forward, whatever the routing)",
    )
    start = time.perf_counter()
    model = random_plain(hf_config, ctx["dtype"], args.seed)
    row.update(build_s=time.perf_counter() - start, model_bytes=sum(p.nbytes for p in model.parameters()))
    if device.type != "cuda":
        row.update(
            status="skipped",
            reason="accelerate's offload keeps offloaded weights in host RAM and copies them to the GPU at every "
            "forward; without a GPU there is no second memory to copy into, so there is nothing to time. The "
            "random-weight model was built (the code a GPU run uses); dispatch and timing were not run.",
        )
        del model
        return row
    cap = ctx["budget"]
    torch.cuda.reset_peak_memory_stats(device)
    row.update(dispatch_like_device_map_auto(model, device, cap))
    warmup, tokens = min(args.warmup_tokens, 1), args.accelerate_decode_tokens
    timed = timed_generation(model, device, ctx["prompt"], warmup, tokens, lambda: None)
    row.update(status="ran", cap_bytes=cap, peak_device_bytes=int(torch.cuda.max_memory_allocated(device)))
    row.update(common(timed, ctx["prompt"], warmup, tokens))
    # Estimated, not counted: accelerate's hooks copy every offloaded weight at every forward.
    row.update(
        est_copy_gb_per_s=row["offloaded_bytes"] / row["s_per_token"] / GB,
        est_copy_fraction_of_peak=row["offloaded_bytes"] / row["s_per_token"] / ctx["peak"],
        notes=["max_memory bounds the weights accelerate places; its activations and KV cache come on top"],
    )
    del model, timed
    return row


def dispatch_like_device_map_auto(
    model: transformers.PreTrainedModel, device: torch.device, cap: int
) -> dict[str, Any]:
    """What ``from_pretrained(..., device_map="auto", max_memory={gpu: cap, "cpu": ...})`` does once the
    weights are read: transformers' device map for the cap, mapped modules on the GPU, accelerate's hooks on
    the rest (their weights stay in host RAM and are copied to the GPU at every forward)."""
    import psutil
    from transformers.integrations.accelerate import _get_device_map, accelerate_dispatch

    max_memory = {device.index: cap, "cpu": psutil.virtual_memory().total}
    device_map = dict(_get_device_map(model, "auto", max_memory, None))
    if "disk" in device_map.values():
        raise RuntimeError("accelerate mapped weights to disk; the baseline needs them in host RAM")
    offloaded = [name for name, where in device_map.items() if where == "cpu"]
    offloaded_bytes = sum(
        t.numel() * t.element_size()
        for name in offloaded
        for t in [*model.get_submodule(name).parameters(), *model.get_submodule(name).buffers()]
    )
    for name, where in device_map.items():
        if where != "cpu":
            model.get_submodule(name).to(device)
    if offloaded:
        accelerate_dispatch(model, None, device_map, None, None, False)
    return dict(
        max_memory={str(k): v for k, v in max_memory.items()},
        modules_on_gpu=len(device_map) - len(offloaded),
        modules_offloaded=len(offloaded),
        offloaded_bytes=offloaded_bytes,
        experts_implementation=getattr(model.config, "_experts_implementation", None),
    )
