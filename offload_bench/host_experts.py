"""Host expert throughput against the machine's memory read bandwidth, and the decode split it buys on traces.

For each expert shape and format, each host kernel (:mod:`offload.kernels.host_experts`) computes synthetic
experts at 1, 4 and 16 tokens, on a thread running torch with a host worker's share of the intra-op threads
and with all of them; GB/s is expert bytes read per second (the stored bytes, scales included; ``int4pack``
reads the experts' converted copy, the same size less alignment), against the best streaming read of a large
fp32 tensor (``torch.sum``) at the same thread counts, taken right before each shape and format's kernels. Then the simulator, with
a stated link rate and per-layer compute time, replays the shared traces at a scarce cache with the rule off
and on (``auto`` at the measured 1-token host rate of the trace's expert shape): hits / copied / on host and
simulated decode tokens/s.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

EXPERT_SHAPES = {  # (hidden, intermediate) of one expert, gated: from the checkpoints' config.json
    "OLMoE-1B-7B": (2048, 1024),
    "Qwen3-30B-A3B": (2048, 768),
    "Mixtral-8x7B": (4096, 14336),
}
SMOKE_SHAPES = {"tiny": (64, 96)}
FORMATS = (
    ("bf16", "float", 0),
    ("int8", "int8", 0),
    ("int4", "int4", 64),
    ("mxfp4", "mxfp4", 32),
    ("fp8", "fp8", 128),
)
TRACE_SHAPES = {"olmoe": "OLMoE-1B-7B"}  # trace file stem prefix -> the expert shape it routes


def read_bandwidth(gib: float = 0.5, repeats: int = 5, torch_threads: int | None = None) -> float:
    """Bytes/s of a streaming read: torch.sum over ``gib`` GiB of fp32, best of ``repeats``, on a thread of
    ``torch_threads`` intra-op threads when given (as a host worker runs)."""
    import torch

    from offload.torch_threads import torch_thread_pool

    if torch_threads is not None:
        with torch_thread_pool(1, torch_threads) as worker:
            return worker.submit(read_bandwidth, gib, repeats).result()
    data = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - began)
    return data.numel() * 4 / best


def thread_counts() -> list[int]:
    """Intra-op torch threads to measure at: a host worker's share with the default 2 workers, and all."""
    import torch

    from offload.runtime.host_compute import torch_threads_per_worker

    return sorted({torch_threads_per_worker(2), torch.get_num_threads()})


def host_table(
    shapes: dict[str, tuple[int, int]],
    repeats: int,
    torch_threads: list[int],
    formats: tuple[str, ...] | None = None,
    token_counts: tuple[int, ...] | None = None,
    read_gib: float | None = None,
) -> list[dict[str, Any]]:
    """One row per shape, format, host kernel, intra-op thread count and token count (``formats`` and
    ``token_counts``: a subset of the labels and of the probe's token counts). ``read_gib``: measure the
    streaming read (that many GiB, best over ``torch_threads``) right before each shape and format's kernels,
    into their rows' ``read_gbps``, and each row's GB/s as ``share_of_read`` of it: on a shared machine the
    bandwidth moves from minute to minute, so a share of it is only fair against a read taken beside the
    kernels."""
    import torch
    import torch.nn.functional as F

    from offload.kernels import ExpertActivation
    from offload.kernels.activation import GateTimesUp
    from offload.kernels.host_experts import host_kernel_candidates
    from offload.memory.int4pack import int4pack_unsupported
    from offload.memory.layout import ExpertLayout
    from offload.runtime import host_rates

    silu = ExpertActivation("silu", True, GateTimesUp(F.silu))
    rows = []
    for shape, (hidden, inter) in shapes.items():
        for label, fmt, group in FORMATS:
            if formats is not None and label not in formats:
                continue
            layout = ExpertLayout(hidden, inter, True, False, torch.bfloat16, format=fmt, group_size=group)
            count = max(2, min(16, (256 << 20) // layout.nbytes))  # more than a last-level cache holds
            read = (
                None
                if read_gib is None
                else max(read_bandwidth(read_gib, torch_threads=t) for t in torch_threads)
            )
            int4pack = int4pack_unsupported(layout) is None  # the copy the runtime keeps on a CUDA device
            experts = host_rates.synthetic_experts(layout, count, int4pack=int4pack)
            for kernel, threads, tokens in itertools.product(
                host_kernel_candidates(layout, int4pack),
                torch_threads,
                token_counts or host_rates.PROBE_TOKENS,
            ):
                seconds = host_rates.host_seconds(kernel, layout, silu, experts, tokens, repeats, threads)
                gbps = layout.nbytes / seconds / 1e9
                row: dict[str, Any] = dict(
                    shape=shape,
                    format=label,
                    kernel=kernel,
                    torch_threads=threads,
                    tokens=tokens,
                    expert_bytes=layout.nbytes,
                    ms=seconds * 1e3,
                    gbps=gbps,
                )
                if read is not None:
                    row.update(read_gbps=read / 1e9, share_of_read=gbps / (read / 1e9))
                rows.append(row)
            del experts
    return rows


MODEL_EXPERTS = {  # MoE layers x experts per layer: the experts a load converts (the checkpoints' config.json)
    "OLMoE-1B-7B": 16 * 64,
    "Qwen3-30B-A3B": 48 * 128,
    "Mixtral-8x7B": 32 * 8,
}


def conversion_table(
    shapes: dict[str, tuple[int, int]], repeats: int, torch_threads: list[int]
) -> list[dict[str, Any]]:
    """The int4pack copy's cost at load: ms to convert one expert (:func:`offload.memory.int4pack.convert_expert`)
    with the uint8-op layout and through torch's converter, side by side, per shape, format and intra-op thread
    count, best of ``repeats``; and what that comes to for the model's every expert."""
    import torch

    from offload.memory.int4pack import INT4PACK_FORMATS, convert_expert
    from offload.memory.layout import ExpertLayout
    from offload.runtime import host_rates
    from offload.torch_threads import torch_thread_pool

    def best_ms(fields: dict[str, torch.Tensor], layout: ExpertLayout, torch_converter: bool) -> float:
        best = math.inf
        for _ in range(repeats):
            began = time.perf_counter()
            convert_expert(fields, layout, torch_converter=torch_converter)
            best = min(best, time.perf_counter() - began)
        return best * 1e3

    rows = []
    for shape, (hidden, inter) in shapes.items():
        for label, fmt, group in FORMATS:
            if fmt not in INT4PACK_FORMATS:
                continue
            layout = ExpertLayout(hidden, inter, True, False, torch.bfloat16, format=fmt, group_size=group)
            fields = host_rates.synthetic_experts(layout, 1)[0]
            for threads in torch_threads:
                with torch_thread_pool(1, threads) as worker:
                    fast, slow = (worker.submit(best_ms, fields, layout, t).result() for t in (False, True))
                experts = MODEL_EXPERTS.get(shape)
                rows.append(
                    dict(
                        shape=shape,
                        format=label,
                        torch_threads=threads,
                        ms_per_expert=fast,
                        torch_converter_ms_per_expert=slow,
                        speedup=slow / fast,
                        model_experts=experts,
                        model_seconds=None if experts is None else experts * fast / 1e3,
                        torch_converter_model_seconds=None if experts is None else experts * slow / 1e3,
                    )
                )
    return rows


def decode_split(
    traces: list[Path], host_rows: list[dict[str, Any]], link_gbps: float, layer_ms: float, fraction: float
) -> list[dict[str, Any]]:
    from cache_policies import CopyOrCompute, HostRates, TimingModel, load_trace, simulate
    from cache_policies.study.sweep_grid import layer_slots

    out = []
    for path in traces:
        shape = next((s for prefix, s in TRACE_SHAPES.items() if path.name.startswith(prefix)), None)
        if shape is None:
            continue
        trace = load_trace(path)
        for label in ("bf16", "int4"):
            best = max(
                (r for r in host_rows if r["shape"] == shape and r["format"] == label and r["tokens"] == 1),
                key=lambda r: r["gbps"],
                default=None,
            )
            if best is None:
                continue
            rates = HostRates.flat(link_gbps, best["gbps"])
            timing = TimingModel(link_gbps, layer_ms / 1e3)
            slots = layer_slots(fraction, trace.num_experts)
            for mode in ("off", "auto"):
                rule = CopyOrCompute(mode, best["expert_bytes"], rates)
                r = simulate(
                    trace, "lru", slots, "layer", timing=timing, expert_bytes=best["expert_bytes"], host=rule
                )
                out.append(
                    dict(
                        trace=path.name,
                        shape=shape,
                        format=label,
                        host_kernel=best["kernel"],
                        host_gbps=best["gbps"],
                        host=mode,
                        hits=r.hits,
                        copied=r.misses,
                        on_host=r.host_computed,
                        accesses=r.accesses,
                        tokens_per_s=r.tokens_per_s,
                    )
                )
    return out
