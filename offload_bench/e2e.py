"""End to end: decode speed of offloaded MoE models of real shapes, demand paging vs prefetch vs accelerate.

    python bench/e2e.py                      # a CUDA GPU: writes bench/results/e2e-<device>.json
    offload-bench e2e --shapes qwen3-30b-a3b --vram-budget 12GB --out /tmp/qwen.json
    python bench/e2e.py --smoke              # CPU, tiny shapes: proves the script runs; NOT performance

This module drives the run; one run is :mod:`offload_bench.e2e_runs`, the targets and output
:mod:`offload_bench.e2e_report`, the shapes :mod:`offload_bench.shapes`.

For each model shape, one model at a time (random weights, built straight into the host store, never
saved), at one VRAM budget, all in one run and side by side:

- ``lru``: demand paging, LRU cache (``prefetch="none"``): every miss stalls compute;
- ``lookahead`` and ``pre-attention`` (what ``prefetch="auto"`` picks for these shapes): the same cache with
  each predictor prefetching on the copy stream (``history``, which measured no help, on request);
- ``accelerate``: the peer baseline, what transformers' ``device_map="auto"`` with ``max_memory={gpu:
  budget, "cpu": ...}`` does, on a plain model of the same config with random weights (accelerate's hooks
  copy every offloaded weight to the GPU at every forward).

Per run: prefill and decode tokens/s (decode timed over ``--decode-tokens`` after ``--warmup-tokens``, with
``torch.cuda.synchronize`` at both ends), expert hit rate, demand misses, prefetch counters, bytes copied and
copy GB/s as a fraction of the pinned host-to-device peak *measured in the same run*, stall time and stall
fraction, peak device memory against the budget, and the floor: a decode token cannot take less than its
demand-missed bytes over the measured peak bandwidth.

Shapes: each transformers config class's defaults describe the checkpoint its docstring names, except where
that checkpoint's config.json differs (stated per shape below). Mixtral and Qwen3 run with their own random
routers: random weights route unlike trained ones, so their hit rates are NOT representative. A shape whose
MoE layers x experts x top-k match ``--routing-trace`` (by default the shared OLMoE trace, so the OLMoE shape)
replays the trace's choices (offload_bench.forced_routing): real access patterns on synthetic weights.

Host RAM: a shape's experts (Mixtral-8x7B: 90 GB in bf16) live in pinned host RAM, and accelerate's baseline
holds the whole model in host RAM, so the two are never resident together: every model is freed (and its
pinned memory given back) before the next is built. A shape that does not fit this machine's host RAM is cut
to the depth that fits (or to ``--layers``), and the output says so. See docs/e2e.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload_bench.e2e_report import fmt, print_row, targets, write
from offload_bench.e2e_runs import GB, routing_label, run_accelerate, run_offloaded
from offload_bench.e2e_sizing import fit_host_ram, fitting_trace, shape_budget
from offload_bench.machine import SMOKE_LABEL, measure_expert_copies, measure_h2d_peak, versions
from offload_bench.shapes import SHAPES, SMOKE_SHAPES, Shape

if TYPE_CHECKING:  # torch is imported when a run starts: `offload-bench --help` and `sweep` stay light
    import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OLMOE_TRACE = ROOT / "data" / "traces" / "olmoe-1b-7b_decode_299.jsonl"
VARIANTS = ("lru", "lookahead", "pre-attention", "int4", "accelerate")  # the default set
# history prefetch; lru with host compute off (copy only): the other offloaded variants run the default,
# host_compute="auto"
EXTRA_VARIANTS = ("history", "lru-host-off")
SETTINGS = (
    "policy",
    "prompt_tokens",
    "warmup_tokens",
    "decode_tokens",
    "accelerate_decode_tokens",
    "max_context",
    "seed",
    "layers",
    "scale_budget",
)
CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--smoke", action="store_true", help=f"tiny shapes on the CPU ({SMOKE_LABEL})")
    add("--shapes", action="append", choices=list(SHAPES), help="default: all three")
    add(
        "--variants",
        action="append",
        choices=[*VARIANTS, *EXTRA_VARIANTS],
        help="default: the first five (int4: LRU with int4 experts); lru-host-off is lru copying every miss "
        "(host compute off)",
    )
    add(
        "--vram-budget",
        default="12GB",
        help="device memory of every run, ours and accelerate's (default 12GB)",
    )
    add("--layers", type=int, help="cut every shape to at most N layers (default: all that fit in host RAM)")
    add(
        "--scale-budget",
        action="store_true",
        help="for a shape cut to fewer layers, a budget that holds the same fraction of its experts as "
        "--vram-budget holds of the full model's (default: --vram-budget as given)",
    )
    add(
        "--routing-trace",
        default=str(OLMOE_TRACE),
        help="trace whose choices are forced on the shapes it "
        "fits (default: the shared OLMoE trace); 'none': every model routes with its own routers",
    )
    add("--policy", default="lru", help="cache policy of the offloaded runs (default lru)")
    add("--prompt-tokens", type=int, default=64)
    add("--warmup-tokens", type=int, default=4, help="untimed decode tokens before the timed ones")
    add("--decode-tokens", type=int, default=32, help="timed decode tokens of the offloaded runs")
    add("--accelerate-decode-tokens", type=int, default=8, help="timed decode tokens of accelerate's run")
    add("--max-context", type=int, default=4096, help="tokens of KV cache the budget reserves")
    add("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    add("--seed", type=int, default=0)
    add("--out", type=Path, help="JSON path (default bench/results/e2e-<device>.json; smoke: a temp file)")


# -- the run ----------------------------------------------------------------------------------------------


def _machine(args: argparse.Namespace) -> tuple[torch.device, dict[str, Shape], torch.dtype] | None:
    """Device, shapes and dtype of this run (the smoke run also shrinks its sizes); None without a GPU."""
    import torch

    from offload.config import resolve_dtype

    if args.smoke:
        torch.set_num_threads(1)  # tiny matmuls: more threads only spin against the copy thread on 2 cores
        args.prompt_tokens, args.warmup_tokens = min(args.prompt_tokens, 8), min(args.warmup_tokens, 2)
        args.decode_tokens = min(args.decode_tokens, 6)
        args.accelerate_decode_tokens, args.max_context = min(args.accelerate_decode_tokens, 2), 64
        return torch.device("cpu"), SMOKE_SHAPES, torch.float32  # bf16 on a CPU: slow, no more
    if not torch.cuda.is_available():
        return None
    dtype = resolve_dtype(args.dtype)
    assert dtype is not None
    return torch.device("cuda", torch.cuda.current_device()), SHAPES, dtype


def _header(
    args: argparse.Namespace,
    prog: str,
    argv: list[str],
    device_name: str,
    dtype: Any,
    peak: dict[str, Any],
    available: int,
) -> dict[str, Any]:
    import psutil

    pinned = (
        "no pinned memory (CPU)"
        if device_name.startswith("cpu")
        else "host store pinned at exact sizes (mmap + cudaHostRegister, offload.memory.host_memory)"
    )
    return dict(
        what=f"{SMOKE_LABEL}: proves the script runs end to end; no number here is a performance figure"
        if args.smoke
        else "decode of random-weight offloaded MoE models of real shapes: demand LRU, lookahead and "
        "pre-attention prefetch, and accelerate's device_map='auto' offload at the same GPU memory cap, side by side",
        smoke=args.smoke,
        complete=False,
        command=" ".join([prog, *argv]),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=device_name,
        versions=versions(),
        dtype=str(dtype).removeprefix("torch."),
        host=dict(
            total_bytes=psutil.virtual_memory().total,
            available_bytes_at_start=available,
            cpus=os.cpu_count(),
            pinned_allocator=pinned,
        ),
        settings=dict(
            vram_budget="slots for a quarter of all experts (smoke)" if args.smoke else args.vram_budget,
            **{k: getattr(args, k) for k in SETTINGS},
            routing_trace=None if args.routing_trace.lower() == "none" else args.routing_trace,
        ),
        h2d_peak=peak,
        floor="floor_s_per_token: demand-missed bytes per decode token / the pinned host-to-device peak; "
        "link_floor_s_per_token: every byte copied per decode token (prefetches too) / the same peak",
        shapes={},
        rows=[],
        targets=[],
    )


def _output_path(args: argparse.Namespace, device_name: str) -> Path:
    if args.out is not None:
        return Path(args.out)
    if args.smoke:
        return Path(tempfile.gettempdir()) / "e2e-smoke.json"  # never a result: keep it out of the repo
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    return RESULTS / f"e2e-{slug}.json"


def _run_shape(
    shape: Shape,
    args: argparse.Namespace,
    variants: list[str],
    env: dict[str, Any],
    result: dict[str, Any],
    path: Path,
) -> None:
    """Every variant on one shape, one model at a time; the JSON is rewritten after every row."""
    import torch

    from offload_bench.machine import free_memory
    from offload_bench.synthetic import shape_survey

    device, dtype, trace, trace_path = env["device"], env["dtype"], env["trace"], env["trace_path"]
    full = shape_survey(shape.build_config(shape.layers), dtype)
    fit = fit_host_ram(shape, full, variants, env["available"], args.layers)
    hf_config = shape.build_config(fit["layers"])
    s = full if fit["layers"] == shape.layers else shape_survey(hf_config, dtype)
    forced = fitting_trace(trace, shape, s)
    budget, budget_note = shape_budget(args, full, s, device, dtype)
    text = hf_config.get_text_config()
    seed = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, int(text.vocab_size), (1, args.prompt_tokens), generator=seed)
    routing = routing_label(trace_path if forced is not None else None)
    result["shapes"][shape.name] = dict(
        source=shape.source,
        config={k: getattr(text, k, None) for k in CONFIG_FIELDS},
        moe_layers=s.num_layers,
        experts_per_layer=s.num_experts,
        top_k=s.top_k,
        expert_bytes=s.layout.nbytes,
        all_experts_bytes=s.total_experts * s.layout.nbytes,
        resident_bytes=s.resident_bytes,
        budget_bytes=budget,
        budget=budget_note,
        routing=routing,
        h2d_expert_sized_bytes_per_s=measure_expert_copies(device, s.layout.nbytes),
        host_plan=fit,
    )
    print(
        f"{shape.name}: {s.num_layers} MoE layers x {s.num_experts} experts, top-{s.top_k}, "
        f"{s.layout.nbytes / 1e6:.2f} MB per expert, {s.total_experts * s.layout.nbytes / GB:.2f} GB of "
        f"experts; routing {routing}" + (f"; {fit['truncated']}" if "truncated" in fit else "")
    )
    ctx = dict(
        device=device,
        dtype=dtype,
        budget=budget,
        peak=env["peak"],
        survey=s,
        prompt=prompt.to(device),
        trace=forced,
        trace_path=trace_path if forced is not None else None,
    )
    for variant in variants:
        try:
            if variant == "accelerate":
                row = run_accelerate(shape, hf_config, args, ctx)
            else:
                row = run_offloaded(shape, hf_config, variant, args, ctx)
        except Exception as exc:  # one failed run must not lose the others: record it, go on
            traceback.print_exc()
            message = str(exc).splitlines()[0][:300] if str(exc) else ""
            row = dict(
                shape=shape.name, variant=variant, status="error", error=f"{type(exc).__name__}: {message}"
            )
        free_memory(device)  # after the except block: its traceback no longer holds the failed model
        row["shape_truncated"] = fit.get("truncated")
        result["rows"].append(row)
        print_row(row)
        write(path, result)


def run(args: argparse.Namespace, prog: str, argv: list[str]) -> int:
    import psutil
    import torch

    from cache_policies import load_trace

    machine = _machine(args)
    if machine is None:
        print(f"{prog}: needs a CUDA GPU; --smoke checks the script on a CPU", file=sys.stderr)
        return 2
    device, shapes, dtype = machine
    chosen = [shapes[name] for name in dict.fromkeys(args.shapes or shapes)]
    variants = list(dict.fromkeys(args.variants or VARIANTS))
    trace_path = None if args.routing_trace.lower() == "none" else Path(args.routing_trace)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    )
    available = psutil.virtual_memory().available
    peak = measure_h2d_peak(device)
    print(f"{device_name}: pinned host-to-device peak {peak['bytes_per_s'] / GB:.1f} GB/s ({peak['how']})")
    if "pageable_bytes_per_s" in peak:
        print(f"  pageable host-to-device {peak['pageable_bytes_per_s'] / GB:.1f} GB/s")
    path = _output_path(args, device_name)
    result = _header(args, prog, argv, device_name, dtype, peak, available)
    env = dict(
        device=device,
        dtype=dtype,
        peak=peak["bytes_per_s"],
        available=available,
        trace=load_trace(trace_path) if trace_path is not None else None,
        trace_path=trace_path,
    )
    for shape in chosen:
        _run_shape(shape, args, variants, env, result, path)
    result["targets"] = targets(result["rows"], [shape.name for shape in chosen])
    result["complete"] = True
    write(path, result)
    print(f"targets ({SMOKE_LABEL}: checks the bookkeeping only):" if args.smoke else "targets:")
    for t in result["targets"]:
        print(f"  {t['status']:7} {t['shape']:14} {t['variant']:10} {t['target']}: {fmt(t['value'], '.2f')}")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python bench/e2e.py",
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring and docs/e2e.md.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), parser.prog, argv)


if __name__ == "__main__":
    sys.exit(main())
