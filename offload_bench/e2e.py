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
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offload_bench.e2e_estimate import estimate_row, measure_host_rates
from offload_bench.e2e_report import fmt, header, print_row, targets, write
from offload_bench.e2e_runs import GB, routing_label, run_accelerate, run_offloaded
from offload_bench.e2e_sizing import fit_host_ram, fitting_trace, shape_budget
from offload_bench.machine import SMOKE_LABEL, measure_expert_copies, measure_h2d_peak
from offload_bench.shapes import SHAPES, SMOKE_SHAPES, Shape

if TYPE_CHECKING:  # torch is imported when a run starts: `offload-bench --help` and `sweep` stay light
    import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OLMOE_TRACE = ROOT / "data" / "traces" / "olmoe-1b-7b_decode_299.jsonl"
VARIANTS = ("lru", "lookahead", "pre-attention", "int4", "accelerate")  # the default set
# history prefetch; lru with host compute off (copy only): the other offloaded variants run the default,
# host_compute="auto"
EXTRA_VARIANTS = ("history", "lru-host-off", "int4-disk")
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
        "(host compute off); int4-disk is int4 with half of the experts in host slots, the rest on disk",
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
    add(
        "--time-limit",
        type=float,
        help="seconds from the start: a row whose estimate (printed before each row) does not fit what is "
        "left is skipped, with its estimate as the reason",
    )
    add(
        "--estimate-only",
        action="store_true",
        help="print each row's estimated build and run time and exit, building nothing; without a GPU it "
        "estimates a GPU run from this machine's host rates and the --assume-* link speeds",
    )
    add("--assume-h2d-gbps", type=float, default=50.0, help="--estimate-only without a GPU: pinned GB/s")
    add(
        "--assume-pageable-gbps",
        type=float,
        default=20.0,
        help="--estimate-only without a GPU: pageable GB/s",
    )


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
    dtype = resolve_dtype(args.dtype)
    assert dtype is not None
    if not torch.cuda.is_available():
        # --estimate-only plans a GPU run from here: budgets planned as for the CPU (no cuBLAS workspace,
        # 32 MiB), rows estimated as for a GPU
        return (torch.device("cpu"), SHAPES, dtype) if args.estimate_only else None
    return torch.device("cuda", torch.cuda.current_device()), SHAPES, dtype


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
        h2d_expert_sized_bytes_per_s=None
        if args.estimate_only
        else measure_expert_copies(device, s.layout.nbytes),
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
        store_dir=env["store_dir"],  # the disk tier's stores (int4-disk), gone with the run
    )
    for variant in variants:
        estimate: dict[str, Any] | None = None
        try:
            estimate = estimate_row(variant, args, ctx, env)
            left = None if env["deadline"] is None else max(0.0, env["deadline"] - time.monotonic())
            print(
                f"  {shape.name:14} {variant:10} estimated {estimate['build_s']:.0f} s to build, "
                f"{estimate['run_s']:.0f} s to run" + ("" if left is None else f" ({left:.0f} s left)"),
                flush=True,
            )
            row: dict[str, Any]
            if args.estimate_only:
                row = dict(shape=shape.name, variant=variant, status="estimated")
                env["compiled"].add(estimate.get("format"))
            elif left is not None and estimate["total_s"] > left:
                row = dict(
                    shape=shape.name,
                    variant=variant,
                    status="skipped",
                    reason=f"estimated {estimate['total_s']:.0f} s, {left:.0f} s left of --time-limit",
                )
            else:
                began = time.monotonic()
                if variant == "accelerate":
                    row = run_accelerate(shape, hf_config, args, ctx)
                else:
                    row = run_offloaded(shape, hf_config, variant, args, ctx)
                    env["compiled"].add(row.get("expert_format"))
                row["wall_s"] = round(time.monotonic() - began, 1)  # beside its estimate
        except Exception as exc:  # one failed run must not lose the others: record it, go on
            traceback.print_exc()
            message = str(exc).splitlines()[0][:300] if str(exc) else ""
            row = dict(
                shape=shape.name, variant=variant, status="error", error=f"{type(exc).__name__}: {message}"
            )
        free_memory(device)  # after the except block: its traceback no longer holds the failed model
        row.update(shape_truncated=fit.get("truncated"), estimate=estimate)
        result["rows"].append(row)
        if not args.estimate_only:
            print_row(row)
        write(path, result)
        if env["on_row"] is not None:
            env["on_row"](row, result)


def run(
    args: argparse.Namespace,
    prog: str,
    argv: list[str],
    on_row: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> int:
    """The whole run; ``on_row(row, result)`` is called after every row (the GPU check judges rows as they
    come)."""
    import psutil
    import torch

    from cache_policies import load_trace

    started = time.monotonic()
    machine = _machine(args)
    if machine is None:
        print(f"{prog}: needs a CUDA GPU; --smoke checks the script on a CPU", file=sys.stderr)
        return 2
    device, shapes, dtype = machine
    chosen = [shapes[name] for name in dict.fromkeys(args.shapes or shapes)]
    variants = list(dict.fromkeys(args.variants or VARIANTS))
    trace_path = None if args.routing_trace.lower() == "none" else Path(args.routing_trace)
    planning = args.estimate_only and not torch.cuda.is_available()
    if planning:
        device_name = "a GPU, estimated from this machine (no GPU here)"
    elif device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({platform.machine()})"
    available = psutil.virtual_memory().available
    if planning:
        available = 1 << 60  # the GPU machine's RAM is not this one's: depth as --layers says
        peak = dict(
            bytes_per_s=args.assume_h2d_gbps * GB,
            pageable_bytes_per_s=args.assume_pageable_gbps * GB,
            how="assumed (--assume-h2d-gbps, --assume-pageable-gbps)",
        )
    else:
        peak = measure_h2d_peak(device)
    print(f"{device_name}: pinned host-to-device peak {peak['bytes_per_s'] / GB:.1f} GB/s ({peak['how']})")
    if "pageable_bytes_per_s" in peak:
        print(f"  pageable host-to-device {peak['pageable_bytes_per_s'] / GB:.1f} GB/s")
    rates = measure_host_rates(device, peak)
    print(
        f"  host rates for the estimates, GB/s: {rates.as_dict()}"
        + (" (unpinned: no GPU)" if planning else "")
    )
    path = _output_path(args, device_name)
    result = header(args, prog, argv, device_name, dtype, peak, available)
    result["host_rates_gbps"] = rates.as_dict()
    env = dict(
        device=device,
        dtype=dtype,
        peak=peak["bytes_per_s"],
        available=available,
        trace=load_trace(trace_path) if trace_path is not None else None,
        trace_path=trace_path,
        rates=rates,
        deadline=None if args.time_limit is None else started + args.time_limit,
        compiled=set(),
        estimated_device=torch.device("cuda") if planning else device,
        on_row=on_row,
    )
    with tempfile.TemporaryDirectory(prefix="e2e-stores-") as stores:
        env["store_dir"] = Path(stores)
        for shape in chosen:
            _run_shape(shape, args, variants, env, result, path)
    if args.estimate_only:
        total = sum(r["estimate"]["total_s"] for r in result["rows"] if r.get("estimate"))
        print(f"estimated in all: {total:.0f} s")
        return 0
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
