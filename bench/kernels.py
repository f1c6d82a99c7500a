"""Expert kernels over the slot pool, side by side: Triton (auto, decode-only, prefill-only), the torch
per-expert loop (the reference) and ``torch.nn.functional.grouped_mm``, on real models' expert shapes.

    python bench/kernels.py                          # a CUDA GPU; writes bench/results/kernels-<gpu>.json
    python bench/kernels.py --models qwen3-30b-a3b --tokens 1 --tokens 256
    python bench/kernels.py --format int4 --format mxfp4   # compressed experts, dequantized in registers
    python bench/kernels.py --smoke                  # tiny shapes, CPU, Triton interpreter: proves the
                                                     # script runs; its timings are NOT performance

Every expert of one layer is resident in a slot pool (bf16 by default), as in an all-resident run, stored in
each ``--format`` asked for (default: float; int8, int4, mxfp4 and fp8 are read and dequantized by the Triton
kernels in registers; the torch loop dequantizes one expert at a time, and is the reference the error is
measured against; grouped_mm reads float experts only). Per row:

- ``kernel_us``: GPU time of the launches alone, replayed from a CUDA graph (what a graph-captured decode
  step pays); ``call_us``: the whole Python call, host work included (plan, tables, launches), timed with
  ``triton.testing.do_bench`` (which flushes L2 between calls).
- ``GB/s``: bytes that must move (weights of every expert with a pair as stored, scales included;
  activations in and out, the ``h`` workspace) over ``kernel_us``, and the fraction of the HBM peak
  *measured in the same run* with a 2 GiB device-to-device copy. The number that matters for small batches.
- ``TFLOP/s``: ``2 * T * k * 3 * H * I`` (gated) over ``kernel_us``. The number that matters for large ones.

Each timed call cycles through several routings whose experts differ (at one token: disjoint expert sets
covering every expert), so weights come from HBM, not from L2, as in a real decode loop.

Targets (issue 6, on an H100, float experts): Triton >= 75% of the measured HBM bandwidth at one token, and
at least as fast as grouped_mm from 256 tokens up. The JSON records whether each was met.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

# This file is called kernels.py, and transformers probes for the optional package ``kernels`` with an
# import: keep this script's folder off sys.path so that probe does not import this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if "--smoke" in sys.argv:
    # Triton's interpreter must be on before triton is imported (torch/transformers import it): see
    # offload.kernels.selection.interpreter_ready.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from offload.memory import formats  # noqa: E402
from offload_bench.kernel_timing import (  # noqa: E402
    DTYPES,
    MODELS,
    SMOKE_MODELS,
    SMOKE_TOKENS,
    TOKENS,
    bench_model,
    measure_peak,
    targets,
)

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    parser.add_argument("--models", action="append", choices=sorted(MODELS), help="default: all four")
    parser.add_argument("--tokens", type=int, action="append", help=f"default: {TOKENS}")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="the compute dtype")
    parser.add_argument(
        "--format",
        action="append",
        choices=formats.FORMATS,
        help="the experts' storage format; repeat for several (default: float)",
    )
    parser.add_argument("--routings", type=int, default=0, help="routings cycled per timed call (0: auto)")
    parser.add_argument(
        "--impl",
        action="append",
        choices=["triton", "triton-decode", "triton-prefill", "torch-loop", "grouped_mm"],
        help="default: all",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/kernels-<device>.json)")
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        models = SMOKE_MODELS
        tokens_list = args.tokens or SMOKE_TOKENS
        dtype = torch.float32 if args.dtype == "bf16" else DTYPES[args.dtype]  # fp32: no bf16 tl.dot in CPU
    else:
        if not torch.cuda.is_available():
            print(
                "bench/kernels.py needs a CUDA GPU; use --smoke to check the script on a CPU", file=sys.stderr
            )
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        models = {m: MODELS[m] for m in (args.models or MODELS)}
        tokens_list = args.tokens or TOKENS
        dtype = DTYPES[args.dtype]
    impls = args.impl or ["triton", "triton-decode", "triton-prefill", "torch-loop", "grouped_mm"]

    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor()})"
    )
    peak, peak_how = measure_peak(device)
    print(f"{device_name}: measured peak {peak / 1e9:.1f} GB/s ({peak_how})")
    rows: list[dict] = []
    for name, shape in models.items():
        n_routings = args.routings or (
            2 if args.smoke else max(2, min(16, math.ceil(shape.experts / shape.top_k)))
        )
        print(f"{name}: H={shape.hidden} I={shape.intermediate} E={shape.experts} k={shape.top_k}")
        for fmt in args.format or ["float"]:
            rows += bench_model(name, shape, tokens_list, dtype, device, peak, impls, n_routings, fmt)

    import triton

    result = dict(
        what=(
            "CPU smoke run through Triton's interpreter: proves the script works; the timings are NOT performance"
            if args.smoke
            else "fused MoE expert kernels over the slot pool vs a per-expert torch loop and grouped_mm"
        ),
        smoke=args.smoke,
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=device_name,
        versions=dict(
            torch=torch.__version__,
            triton=triton.__version__,
            python=platform.python_version(),
            cuda=torch.version.cuda,
        ),
        dtype=str(dtype).removeprefix("torch."),
        formats=args.format or ["float"],
        peak_bytes_per_s=peak,
        peak_measured_with=peak_how,
        models={name: vars(shape) for name, shape in models.items()},
        rows=rows,
        targets=[] if args.smoke else targets(rows),
    )
    if args.out is not None:
        path = args.out
    elif args.smoke:
        path = Path(tempfile.gettempdir()) / "kernels-smoke.json"  # never a result: keep it out of the repo
    else:
        slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
        path = RESULTS / f"kernels-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for t in result["targets"]:
        print(
            f"target {t['model']} T={t['tokens']}: {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
